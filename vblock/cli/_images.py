"""Opening and creating images for the verbs: friendly errors, option strings, safe replacement.

``-o`` option strings are qemu-img's: ``cluster_size=64k,table_size=4``. Values of options whose
name ends in ``_size`` accept size suffixes; the driver's own converters check the rest.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os

import vblock
from vblock.block.registry import get_driver, probe_format
from vblock.cli.output import UsageError, parse_size

__all__ = ["open_image", "add_force_share", "parse_options", "temporary_path", "replace_atomically",
           "check_format"]

_SIZE_OPTIONS = ("cluster_size",)


def check_format(fmt: str | None) -> str | None:
    """``fmt`` if a driver serves it (raises ``UnknownFormatError`` naming it otherwise)."""
    if fmt is not None:
        get_driver(fmt)
    return fmt


def add_force_share(parser, what="the image") -> None:
    """``-U/--force-share`` (``args.force_share``), as qemu-img's."""
    parser.add_argument("-U", "--force-share", dest="force_share", action="store_true",
                        help=f"open {what} even while another process writes to it (no conflicting "
                             "locks; the data may change underneath)")


def open_image(path, fmt=None, read_only=True, cache="writeback", force_share=False):
    """Open ``path`` for a tool: read-only and through the page cache by default. A missing file is
    a ``FileNotFoundError`` naming it (before any probing), a directory an ``IsADirectoryError``.
    The image is locked as ``vblock.open_image`` locks it (``ImageLockedError`` while another
    process holds a conflicting lock); ``force_share`` is ``-U``."""
    check_format(fmt)
    if fmt not in ("memory", "null"):
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if fmt is None and read_only:
        # Looking is safe: only writing to a raw disk whose header was probed is dangerous, so
        # the registry's warning about probing raw is kept for writers and silenced here.
        fmt = _quiet_probe(path)
    return vblock.open_image(path, format=fmt, read_only=read_only, cache=cache, force_share=force_share)


def _quiet_probe(path) -> str:
    log = logging.getLogger("vblock.block.registry")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        return probe_format(path)
    finally:
        log.setLevel(old)


def parse_options(text: str | None) -> dict:
    """``"a=1,b=2"`` -> ``{"a": "1", "b": "2"}`` (``*_size`` values as byte counts)."""
    out = {}
    if not text:
        return out
    for item in text.split(","):
        if not item:
            continue
        name, eq, value = item.partition("=")
        name = name.strip()
        if not eq or not name:
            raise UsageError(f"invalid option {item!r}: expected name=value")
        out[name] = parse_size(value, name) if name in _SIZE_OPTIONS else value
    return out


def temporary_path(final: str) -> str:
    """A name in the same directory as ``final`` (so rename is atomic) that nothing else uses."""
    d, base = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{base}.vblock-{os.getpid()}.tmp")


@contextlib.contextmanager
def replace_atomically(final: str, durable: bool = True):
    """Yield a temporary path next to ``final``; on success rename it over ``final``, on any
    failure (Ctrl-C included) remove it, so ``final`` is never left half-written. ``durable``
    also syncs the directory so the rename survives a crash (on ext4 that commits the journal,
    which writes out the new file's data too: skipped for cache=unsafe conversions)."""
    if os.path.isdir(final):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), final)
    parent = os.path.dirname(os.path.abspath(final))
    if not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, "no such directory", parent)
    tmp = temporary_path(final)
    try:
        yield tmp
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

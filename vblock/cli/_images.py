"""Opening and creating images for the verbs: friendly errors, formats, option strings.

``-o`` option strings are qemu-img's: ``cluster_size=64k,table_size=4``. Values of options whose
name ends in ``_size`` accept size suffixes; the driver's own converters check the rest. ``-o help``
(or ``-o ?``) asks for the format's create options instead (``options_help``). Where a new image
goes is ``_destination``'s business.
"""

from __future__ import annotations

import errno
import logging
import os

import vblock
from vblock.block.backing import backing_path
from vblock.block.interface import BlockDriver
from vblock.block.registry import available, get_driver, probe_format
from vblock.cli.output import UsageError, parse_size
from vblock.nbd.uri import is_nbd_uri

__all__ = [
    "open_image",
    "add_force_share",
    "parse_options",
    "wants_help",
    "options_help",
    "check_format",
    "check_creatable",
]

_SIZE_OPTIONS = ("cluster_size",)


def check_format(fmt: str | None) -> str | None:
    """``fmt`` if a driver serves it (raises ``UnknownFormatError`` naming it otherwise)."""
    if fmt is not None:
        get_driver(fmt)
    return fmt


def _creatable(cls) -> bool:
    return (
        cls.file_backed and getattr(cls.create, "__func__", None) is not BlockDriver.create.__func__
    )


def check_creatable(fmt: str) -> str:
    """``fmt`` if the tools can create an image file of it; ``UsageError`` naming the formats
    that can otherwise (``null`` and ``memory`` make no file; some drivers only read)."""
    if not _creatable(get_driver(fmt)):
        names = []
        for name in available():
            try:
                if _creatable(get_driver(name)):
                    names.append(name)
            except Exception:  # a plug-in that fails to load is no choice
                continue
        raise UsageError(
            f"format '{fmt}' makes no image file; formats that can be created: {', '.join(names)}"
        )
    return fmt


def add_force_share(parser, what="the image") -> None:
    """``-U/--force-share`` (``args.force_share``), as qemu-img's."""
    parser.add_argument(
        "-U",
        "--force-share",
        dest="force_share",
        action="store_true",
        help=f"open {what} even while another process writes to it (no conflicting "
        "locks; the data may change underneath)",
    )


def open_image(
    path, fmt=None, read_only=True, cache="writeback", no_backing=False, force_share=False
):
    """Open ``path`` for a tool: read-only and through the page cache by default. A missing file is
    a ``FileNotFoundError`` naming it (before any probing), a directory an ``IsADirectoryError``; a
    file whose header shows a format vblock has no driver for an ``UnknownFormatError`` naming that
    format. ``no_backing`` leaves the backing chain closed (for verbs that need only this image's
    metadata, so that they work while the backing file is missing). The image is locked as
    ``vblock.open_image`` locks it (``ImageLockedError`` while another process holds a conflicting
    lock); ``force_share`` is ``-U``."""
    check_format(fmt)
    if is_nbd_uri(path):  # a network export: no file to look at, raw unless told otherwise
        return vblock.open_image(
            path,
            format=fmt,
            read_only=read_only,
            cache=cache,
            no_backing=no_backing,
            force_share=force_share,
        )
    if fmt not in ("memory", "null"):
        if not os.path.exists(path):
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)
        if os.path.isdir(path):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
    if fmt is None and read_only:
        # Looking is safe: only writing to a raw disk whose header was probed is dangerous, so
        # the registry's warning about probing raw is kept for writers and silenced here.
        fmt = _quiet_probe(path)
    return vblock.open_image(
        path,
        format=fmt,
        read_only=read_only,
        cache=cache,
        no_backing=no_backing,
        force_share=force_share,
    )


def backing_location(image: str, name: str) -> str:
    """Where the backing file ``name`` given for ``image`` lives (an NBD URI as it is)."""
    return backing_path(os.path.abspath(image), name)


def _quiet_probe(path) -> str:
    log = logging.getLogger("vblock.block.registry")
    old = log.level
    log.setLevel(logging.ERROR)
    try:
        return probe_format(path)
    finally:
        log.setLevel(old)


def wants_help(text: str | None) -> bool:
    """Whether an ``-o`` string asks for help (``help`` or ``?`` among its items, as qemu-img)."""
    return bool(text) and any(item.strip() in ("help", "?") for item in text.split(","))


def options_help(fmt: str) -> str:
    """The create options of ``fmt``, one per line, as ``qemu-img create -f FMT -o help`` lists them."""
    cls = get_driver(fmt)
    lines = ["Supported options:"]
    for name in sorted(cls.create_options):
        conv = cls.create_options[name]
        kind = "size" if name in _SIZE_OPTIONS else "num" if conv is int else "str"
        text = cls.create_option_help.get(name, "")
        lines.append(f"  {f'{name}=<{kind}>':<24}" + (f" - {text}" if text else "").rstrip())
    if len(lines) == 1:
        lines.append("  (none)")
    return "\n".join(lines)


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

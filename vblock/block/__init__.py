"""The block layer: one interface for every image format, and the front door that opens images.

```python
import vblock
img = vblock.open_image(path, format=None, read_only=False, cache="none", aio="auto",
                        discard="unmap", force_share=False, locking="auto", **driver_options)
img = vblock.create_image(path, fmt, size, locking="auto", **format_options)
ram = vblock.open_image(None, format="memory", size=64 << 20)   # a RAM disk (no file)
```

``Image`` (``image.py``) checks requests and bounces unaligned ones; the driver operation table and
its guarantees are in ``interface.py``; drivers are found through ``registry.py``, file formats
recognised by their magic through ``probe.py`` (which knows formats no driver serves), backing
chains opened for the drivers by ``backing.py``, and one image copied into another by
``convert.py`` (the engine of ``vblock convert``).

NBD. ``path`` may be an NBD URI (``nbd+unix:///EXPORT?socket=PATH``, ``nbd://HOST:PORT/EXPORT``):
the driver's host file is then a connection to the export (``vblock.nbd.client``). Such images
are raw unless a format is given; other formats open only read-only; no image locks are taken
(there is no local file to lock: the server guards its image).

Image locks. Every open of an image that lives in a file (regular file, block or character
device; not memory or null images) takes QEMU-compatible locks on it (the bytes and the fcntl
calls are ``vblock.hostio.lock``'s), so vblock and QEMU processes exclude each other as QEMU
processes do among themselves. This layer decides the permissions:

* read-write: uses consistent read, write and resize; shares neither write nor resize (others may
  read, and may "write unchanged");
* read-only: uses consistent read; shares nothing that would change the data (not write, not
  resize), so it fails while another open writes and blocks writers while it is open;
* read-only with ``force_share=True`` (``qemu-img -U``): uses consistent read and shares
  everything, so it coexists with a writer (and may see data change under it). ``force_share``
  with a read-write open is a ``ValueError``.

Backing files are opened read-only (by ``backing.py``) and lock as read-only opens (what QEMU's
backing children do under a parent that does not share write); ``force_share`` and ``locking`` are
passed down the chain. The locks are taken after the format is known (probing reads the header)
and before the driver reads or writes anything; they are dropped when the ``Image`` closes, and
at once when the open fails. A conflict raises ``ImageLockedError``. ``locking="on"`` refuses a
file system without OFD locks, ``"auto"`` opens there without locks, ``"off"`` takes none.
"""

from __future__ import annotations

import contextlib
import errno
import os

from vblock.block.backing import opening
from vblock.block.image import Image
from vblock.block.interface import (
    AIO_MODES,
    CACHE_MODES,
    DATA,
    DISCARD_MODES,
    UNALLOCATED,
    ZERO,
    BlockDriver,
    Limits,
    OpenOptions,
    Run,
)
from vblock.block.registry import available, get_driver, probe_format, register
from vblock.errors import UnknownFormatError, UnknownOptionError, UnsupportedError
from vblock.hostio.lock import (
    LOCKING_MODES,
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    ImageLock,
)
from vblock.nbd.uri import is_nbd_uri

__all__ = [
    "DATA",
    "UNALLOCATED",
    "ZERO",
    "BlockDriver",
    "Image",
    "Limits",
    "OpenOptions",
    "Run",
    "available",
    "create_image",
    "lock_permissions",
    "open_image",
    "register",
]


def _choice(name, value, allowed):
    if value not in allowed:
        raise UnknownOptionError(
            name, f"option {name}={value!r} is not one of {', '.join(allowed)}"
        )
    return value


def _convert(table: dict, given: dict, fmt: str, kind: str) -> dict:
    """Check option names against a driver's table and convert the values."""
    out = {}
    for name, value in given.items():
        try:
            conv = table[name]
        except KeyError:
            known = ", ".join(sorted(table)) or "none"
            raise UnknownOptionError(
                name, f"format {fmt!r} has no {kind} option {name!r} (known: {known})"
            ) from None
        try:
            out[name] = conv(value) if conv is not None else value
        except (TypeError, ValueError) as exc:
            raise UnknownOptionError(
                name, f"format {fmt!r}: bad value {value!r} for option {name!r}: {exc}"
            ) from None
    return out


def lock_permissions(read_only: bool, force_share: bool = False) -> tuple:
    """``(perm, shared)``: the ``vblock.hostio.lock`` permission masks an open uses and shares."""
    if not read_only:
        if force_share:
            raise ValueError(
                "force_share=True needs read_only=True: a read-write open cannot "
                "share write and resize with other opens"
            )
        return PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, PERM_ALL & ~(
            PERM_WRITE | PERM_RESIZE
        )
    if force_share:
        return PERM_CONSISTENT_READ, PERM_ALL
    return PERM_CONSISTENT_READ, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE)


def _lock(cls, path, read_only: bool, force_share: bool, locking: str):
    """The ``ImageLock`` for an open of ``path`` by driver ``cls``, or None (no file, an NBD URI,
    or off)."""
    if not path or not cls.file_backed or locking == "off" or is_nbd_uri(path):
        return None
    perm, shared = lock_permissions(read_only, force_share)
    return ImageLock(path, perm, shared, locking)


def _path(path):
    if path is None:
        return None
    return os.fspath(path)


def _nbd_format(uri, format, read_only):
    """The format of an image on an NBD export: raw unless given (an export is a disk's bytes:
    what a server exports is already the guest's view). Formats other than raw need a file that
    grows to write, which an export is not: refused for read-write opens."""
    if format is None or format == "raw":
        return "raw"
    if not read_only:
        raise UnsupportedError(
            f"{uri}: a {format} image on an NBD export cannot be opened "
            f"read-write (it needs a file that grows; an export has a fixed "
            f"size): open it read-only, or put a local overlay on it"
        )
    return format


def open_image(
    path: str | os.PathLike,
    format: str | None = None,
    read_only: bool = False,
    cache: str = "none",
    aio: str = "auto",
    discard: str = "unmap",
    no_backing: bool = False,
    force_share: bool = False,
    locking: str = "auto",
    **driver_options,
) -> Image:
    """Open an image and return its ``Image``.

    ``format=None`` probes the file's header; a file no driver recognises opens as raw with a
    logged warning (give ``format="raw"`` for raw disks: a raw disk is then never reinterpreted).
    ``cache``: "none" (O_DIRECT), "writeback" (page cache; flush = fdatasync) or "unsafe" (page
    cache; flush does nothing: data can be lost on a host crash). ``aio``: host engine. ``discard``:
    "unmap" passes discards down, "ignore" drops them. Other keywords are format options, checked
    against the driver's ``open_options``. Memory and null images need no file: ``path`` may be
    None and ``size`` is an option. ``no_backing`` opens the image without its backing chain (see
    ``OpenOptions``): for looking at or mending an image whose backing file is missing. A file whose
    header shows a format with no driver (qcow2, vmdk...) raises ``UnknownFormatError`` naming it;
    ``format="raw"`` opens any file as raw. ``force_share`` and ``locking``: image locks (see the
    module docstring). Raises ``UnknownFormatError``, ``UnknownOptionError`` (naming the option),
    ``ValueError`` (``force_share`` on a read-write open), ``ImageLockedError``, ``OSError``,
    ``ImageError`` and ``BackingFileError`` (both of those: a backing file the host cannot open,
    named with the image).
    """
    _choice("cache", cache, CACHE_MODES)
    _choice("aio", aio, AIO_MODES)
    _choice("discard", discard, DISCARD_MODES)
    _choice("locking", locking, LOCKING_MODES)
    lock_permissions(bool(read_only), bool(force_share))  # refuses force_share with read-write
    path = _path(path)
    if is_nbd_uri(path):
        format = _nbd_format(path, format, bool(read_only))
    if format is None:
        if not path:
            raise UnknownFormatError("no path and no format: give format= (e.g. 'memory')")
        format = probe_format(path)
    cls = get_driver(format)
    options = OpenOptions(
        read_only=bool(read_only),
        cache=cache,
        aio=aio,
        discard=discard,
        driver_options=_convert(cls.open_options, driver_options, format, "open"),
        no_backing=bool(no_backing),
        force_share=bool(force_share),
        locking=locking,
    )
    lock = _lock(cls, path, options.read_only, options.force_share, locking)
    try:
        with opening(path):  # the backing chain's loop check sees this image
            driver = cls.open(path, options)
        if driver.read_only and not options.read_only and lock is not None:
            lock.change(*lock_permissions(True, False))  # a driver that can only read
        return Image(driver, format, options, lock=lock)
    except BaseException:
        if lock is not None:
            lock.close()
        raise


def create_image(
    path: str | os.PathLike | None,
    fmt: str,
    size: int,
    force_share: bool = False,
    locking: str = "auto",
    **format_options,
) -> Image:
    """Create ``path`` as an empty ``fmt`` image of ``size`` bytes (overwriting it) and return it
    open for writing (cache "none" where the host allows it, else "writeback"). Format options are
    checked against the driver's ``create_options``. A memory image with no path is a fresh RAM disk.

    An existing file is overwritten only if a read-write open could lock it (else
    ``ImageLockedError``, and the file is untouched); ``locking`` as for ``open_image``;
    ``force_share=True`` is a ``ValueError`` (the image is returned open for writing)."""
    cls = get_driver(fmt)
    if type(size) is not int or size < 0:
        raise ValueError(f"size must be a non-negative int, not {size!r}")
    _choice("locking", locking, LOCKING_MODES)
    lock_permissions(False, bool(force_share))
    options = _convert(cls.create_options, format_options, fmt, "create")
    path = _path(path)
    with contextlib.ExitStack() as guard:
        if path and os.path.exists(path):
            lock = _lock(cls, path, False, False, locking)
            if lock is not None:
                guard.enter_context(lock)
        cls.create(path, size, options)
    open_opts = {"locking": locking}
    if "size" in cls.open_options and not path:
        open_opts["size"] = size
    try:
        return open_image(path, format=fmt, **open_opts)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # O_DIRECT refused by the file system (tmpfs...)
            raise
        return open_image(path, format=fmt, cache="writeback", **open_opts)

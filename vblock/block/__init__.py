"""The block layer: one interface for every image format, and the front door that opens images.

```python
import vblock
img = vblock.open_image(path, format=None, read_only=False, cache="none", aio="auto",
                        discard="unmap", **driver_options)
img = vblock.create_image(path, fmt, size, **format_options)
ram = vblock.open_image(None, format="memory", size=64 << 20)   # a RAM disk (no file)
```

``Image`` (``image.py``) checks requests and bounces unaligned ones; the driver operation table and
its guarantees are in ``interface.py``; drivers are found through ``registry.py``, file formats
recognised by their magic through ``probe.py`` (which knows formats no driver serves), and backing
chains opened for the drivers by ``backing.py``.
"""

from __future__ import annotations

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
from vblock.errors import UnknownFormatError, UnknownOptionError

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
    "open_image",
    "register",
]


def _choice(name, value, allowed):
    if value not in allowed:
        raise UnknownOptionError(name, f"option {name}={value!r} is not one of {', '.join(allowed)}")
    return value


def _convert(table: dict, given: dict, fmt: str, kind: str) -> dict:
    """Check option names against a driver's table and convert the values."""
    out = {}
    for name, value in given.items():
        try:
            conv = table[name]
        except KeyError:
            known = ", ".join(sorted(table)) or "none"
            raise UnknownOptionError(name, f"format {fmt!r} has no {kind} option {name!r} (known: {known})") from None
        try:
            out[name] = conv(value) if conv is not None else value
        except (TypeError, ValueError) as exc:
            raise UnknownOptionError(name, f"format {fmt!r}: bad value {value!r} for option {name!r}: {exc}") from None
    return out


def _path(path):
    if path is None:
        return None
    return os.fspath(path)


def open_image(
    path,
    format: str | None = None,
    read_only: bool = False,
    cache: str = "none",
    aio: str = "auto",
    discard: str = "unmap",
    no_backing: bool = False,
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
    ``format="raw"`` opens any file as raw. Raises ``UnknownFormatError``, ``UnknownOptionError``
    (naming the option), ``OSError``, ``ImageError`` and ``BackingFileError`` (both of those: a
    backing file the host cannot open, named with the image).
    """
    _choice("cache", cache, CACHE_MODES)
    _choice("aio", aio, AIO_MODES)
    _choice("discard", discard, DISCARD_MODES)
    path = _path(path)
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
    )
    with opening(path):  # the backing chain's loop check sees this image
        driver = cls.open(path, options)
    return Image(driver, format, options)


def create_image(path, fmt: str, size: int, **format_options) -> Image:
    """Create ``path`` as an empty ``fmt`` image of ``size`` bytes (overwriting it) and return it
    open for writing (cache "none" where the host allows it, else "writeback"). Format options are
    checked against the driver's ``create_options``. A memory image with no path is a fresh RAM disk."""
    cls = get_driver(fmt)
    if type(size) is not int or size < 0:
        raise ValueError(f"size must be a non-negative int, not {size!r}")
    options = _convert(cls.create_options, format_options, fmt, "create")
    path = _path(path)
    cls.create(path, size, options)
    open_opts = {}
    if "size" in cls.open_options and not path:
        open_opts["size"] = size
    try:
        return open_image(path, format=fmt, **open_opts)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # O_DIRECT refused by the file system (tmpfs...)
            raise
        return open_image(path, format=fmt, cache="writeback", **open_opts)

"""Backing chains: the block layer opens a driver's backing file, and refuses loops.

A driver whose image names a backing file does not open it itself: it calls
``options.open_backing(self.path, name, fmt)`` (``OpenOptions.open_backing``), which comes here
(or to the opener an embedder put in ``OpenOptions.backing_opener``). What this opener promises:

* the name is resolved as QEMU resolves it (``backing_path``): an absolute name or an NBD URI as
  it is, a relative one against the directory of the image that names it;
* the backing image is opened read-only, with the parent's cache and aio modes and its image-lock
  settings (``force_share``, ``locking``), probing its format unless the parent recorded one;
* the loop check comes before the open, so a loop is reported as a loop and not as the lock
  conflict the chain's own locks would meet;
* a backing file that leads back to an image being opened in this thread raises ``ImageError``
  (field ``backing_file``), whatever the chain's length;
* a backing file the host cannot open raises ``BackingFileError``: an ``ImageError`` and an
  ``OSError`` with the host's errno, naming both files. Errors about the backing file itself
  (corrupt, a foreign format, its own missing backing file) pass through unchanged.

``open_image`` records every image it opens in the thread's chain while the driver's ``open``
runs (``opening``), so the loop check covers the top image too. Opening happens on the caller's
thread; the chain is thread-local, so threads opening images at once do not see each other.
"""

from __future__ import annotations

import contextlib
import os
import threading

from vblock.errors import BackingFileError, ImageError
from vblock.nbd.uri import is_nbd_uri

__all__ = ["backing_path", "open_backing", "opening"]

_chain = threading.local()  # .paths: realpaths of the images being opened in this thread


def backing_path(parent: str, name: str) -> str:
    """Where the backing file ``name`` that image ``parent`` stores lives (an NBD URI is a
    location of its own)."""
    if os.path.isabs(name) or is_nbd_uri(name):
        return name
    return os.path.join(os.path.dirname(parent), name)


@contextlib.contextmanager
def opening(path):
    """Record ``path`` as being opened in this thread for the duration (nothing for no path)."""
    if not path:
        yield
        return
    real = os.path.realpath(path)
    paths = getattr(_chain, "paths", None)
    top = paths is None
    if top:
        paths = _chain.paths = set()
    added = real not in paths
    paths.add(real)
    try:
        yield
    finally:
        if added:
            paths.discard(real)
        if top:
            del _chain.paths


def open_backing(parent: str, name: str, fmt, options):
    """Open the backing file ``name`` of the image ``parent`` (opened with ``options``) and return
    its ``Image``. ``fmt`` is the format the parent recorded, or None to probe."""
    from vblock.block import open_image  # the front door, above this module in the package

    if "\0" in name:  # no file system path holds one; the header's name field is corrupt
        raise ImageError(parent, "backing_file", "backing file name contains a NUL byte")
    bpath = backing_path(parent, name)
    if os.path.realpath(bpath) in getattr(_chain, "paths", ()):
        raise ImageError(parent, "backing_file", "backing file chain has a loop")
    try:
        return open_image(
            bpath,
            format=fmt,
            read_only=True,
            cache=options.cache,
            aio=options.aio,
            force_share=options.force_share,
            locking=options.locking,
        )
    except BackingFileError:
        raise  # the backing file's own backing file: that error names the right pair already
    except OSError as exc:
        # The host's own words for the errno: the message names both files already.
        reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or str(exc))
        raise BackingFileError(parent, name, exc.errno, reason) from exc

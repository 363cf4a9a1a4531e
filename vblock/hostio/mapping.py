"""``FileMapping``: a host file's bytes read in place through the page cache, and zero detection.

A copy from one file into another through a buffer moves every byte twice: the read copies it out
of the page cache, the write copies it back in. Mapping the source and handing views of the
mapping to the write moves it once. ``vblock convert`` does that for raw sources read through the
page cache.

The hazard of a mapping is a file that shrinks while it is mapped: touching a page past the new
end raises SIGBUS, which would end the process. So nothing in Python reads a view directly:
``zero_granules`` scans memory in the shim under a SIGBUS guard and reports EFAULT instead, and a
write whose source page is gone fails in the kernel with EFAULT.
"""

from __future__ import annotations

import mmap
import os

from ._binding import EINVAL, ffi, host_error, lib

_from_buffer = ffi.from_buffer
_CHAR_ARRAY = ffi.typeof("char[]")


def zero_granules(view, granule: int) -> bytes:
    """One byte per ``granule`` bytes of ``view`` (the last granule may be shorter): 1 where the
    granule holds only zeros, else 0. Safe on a ``FileMapping`` view: raises ``OSError(EFAULT)``
    if the mapped file shrank under it."""
    if granule <= 0:
        raise ValueError(f"granule must be > 0, got {granule}")
    n = len(view)
    out = bytearray(-(-n // granule))
    ret = lib.vbio_zero_granules(
        _from_buffer(_CHAR_ARRAY, view, False), n, granule, _from_buffer(_CHAR_ARRAY, out, True)
    )
    if ret < 0:
        raise OSError(-ret, os.strerror(-ret) + " (scanning for zeros: did the file shrink?)")
    return bytes(out)


class FileMapping:
    """A read-only, shared mapping of the first ``length`` bytes of the file at ``path``.

    ``view(offset, length)`` returns a read-only ``memoryview`` of those bytes (the file's page
    cache, not a copy). Pass views to writes and to ``zero_granules``; do not index them from
    Python (see the module docstring). The mapping stays valid while any view of it lives;
    ``close()`` drops this object's reference only.

    Pages not in the page cache are read in by page faults, with the kernel's read-around, which
    keeps up with explicit reads in flight for a cold conversion; asking for read-ahead
    (``MADV_WILLNEED``) costs time when the file is cached and is erratic when it is not, and
    ``MADV_SEQUENTIAL`` gains nothing, so neither is used.
    """

    def __init__(self, path, length: int):
        self.path = os.fsdecode(path)
        self.length = length
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, length, prot=mmap.PROT_READ) if length else None
        except (OSError, ValueError) as exc:
            raise host_error(getattr(exc, "errno", None) or EINVAL, "mmap", self.path) from exc
        finally:
            os.close(fd)
        self._view = memoryview(self._map) if length else memoryview(b"")

    def view(self, offset: int, length: int) -> memoryview:
        if self._map is None and self.length:
            raise ValueError(f"{self.path}: the mapping is closed")
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(
                f"{self.path}: [{offset}, {offset + length}) is outside the "
                f"{self.length} mapped bytes"
            )
        return self._view[offset : offset + length]

    def release(self, offset: int, length: int):
        """Unmap the whole pages inside [offset, offset+length) from this process (their views
        read them again from the file if used); the file and its page cache are untouched. A
        caller done with a range pays the unmapping as it goes instead of all at once at the end
        (the cost grows with the size mapped)."""
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = min(offset + length, self.length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start and self._map is not None:
            self._map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self):
        self._view = memoryview(b"")
        self._map = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

"""Guest memory: regions of host buffers placed at guest-physical addresses.

Every access names a guest-physical range ``[addr, addr + length)`` and is checked before it is
served: ``addr`` and ``length`` are non-negative, ``addr + length`` does not pass 2^64 (a guest
address is a u64 and must not wrap), and the whole range lies inside *one* region (a range that
spans a gap between regions, or two adjacent regions, is refused: the block layer gets one
contiguous host buffer per descriptor, never a stitched copy).

Views are zero-copy ``memoryview`` slices (format ``'B'``) of the region's buffer, so data moves
between guest memory and the host file without a bytes copy; a slice of an ``mmap``-backed region at
an aligned guest address is aligned in host memory too, which is what O_DIRECT needs.

Threads: regions are fixed at construction, so lookups need no lock. Guest memory is shared with
the guest (or the test driver) by design; ordering between the two sides is discussed in
``queue.py``.
"""

from __future__ import annotations

import bisect
import mmap
from collections.abc import Iterable
from typing import Any

from vblock.errors import GuestError

__all__ = ["GuestMemory", "GuestMemoryError"]

_U64_LIMIT = 1 << 64


class GuestMemoryError(GuestError):
    """A guest-physical range lies outside guest memory, spans a gap, or wraps past 2^64."""


_ACCEPTS = (
    "GuestMemory takes a list of (guest_phys_base, buffer) pairs of writable buffers, "
    "e.g. GuestMemory([(0, ram)]) with ram an mmap or bytearray the emulator owns"
)


class GuestMemory:
    """Guest RAM as a set of regions.

    ``GuestMemory([(guest_phys_base, buffer), ...])`` wraps an emulator's own buffers: each a
    writable, contiguous buffer (an ``mmap`` or ``bytearray`` the emulator owns is the normal
    case; anything with the writable buffer protocol will do), placed at a non-negative
    guest-physical base. The emulator keeps using the same buffers: the device reads and writes
    them in place, without copies, and keeps them alive. ``GuestMemory.anonymous(size)`` makes
    page-aligned, ``mmap``-backed RAM at guest-physical 0. Regions must not overlap. Anything
    else raises ``TypeError`` / ``ValueError`` saying what is accepted.
    """

    __slots__ = ("_bases", "_ends", "_views", "_base0", "_end0", "_view0", "_keep", "size")

    def __init__(self, regions: Iterable[tuple[int, Any]]) -> None:
        spans = []
        keep = []
        if isinstance(regions, (bytes, bytearray, memoryview, mmap.mmap)) or not hasattr(
            regions, "__iter__"
        ):
            raise TypeError(f"{_ACCEPTS}; got {type(regions).__name__}")
        for i, pair in enumerate(regions):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise TypeError(f"{_ACCEPTS}; region {i} is {type(pair).__name__}, not a pair")
            base, buffer = pair
            if isinstance(base, bool) or not isinstance(base, int):
                raise TypeError(f"{_ACCEPTS}; region {i} base is {type(base).__name__}, not an int")
            try:
                view = memoryview(buffer)
            except TypeError:
                raise TypeError(
                    f"{_ACCEPTS}; region {i} buffer is {type(buffer).__name__}, "
                    "which has no buffer protocol"
                ) from None
            if view.readonly:
                kind = type(buffer).__name__
                raise TypeError(f"{_ACCEPTS}; region {i} buffer ({kind}) is read-only")
            if not view.contiguous:
                raise ValueError(f"{_ACCEPTS}; region {i} buffer is not contiguous")
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            if base < 0 or base + len(view) > _U64_LIMIT:
                raise ValueError(
                    f"region at {base:#x} of {len(view)} bytes is outside the 64-bit space"
                )
            if len(view):
                spans.append((base, base + len(view), view))
            keep.append(buffer)
        spans.sort(key=lambda s: s[0])
        for (_, end, _), (base, _, _) in zip(spans, spans[1:]):
            if base < end:
                raise ValueError(f"guest memory regions overlap at {base:#x}")
        if not spans:
            raise ValueError("guest memory needs at least one non-empty region")
        self._bases = [s[0] for s in spans]
        self._ends = [s[1] for s in spans]
        self._views = [s[2] for s in spans]
        # The common case is one region: served without a search.
        self._base0, self._end0, self._view0 = spans[0]
        self._keep = keep
        self.size = sum(len(v) for v in self._views)

    @classmethod
    def anonymous(cls, size: int, base: int = 0) -> GuestMemory:
        """``size`` bytes of zeroed, page-aligned anonymous memory at guest-physical ``base``."""
        return cls([(base, mmap.mmap(-1, size))])

    @property
    def regions(self) -> list[tuple[int, memoryview]]:
        """``[(guest_phys_base, memoryview), ...]`` sorted by address."""
        return list(zip(self._bases, self._views))

    def view(self, addr: int, length: int) -> memoryview:
        """A zero-copy view of ``[addr, addr + length)``; ``GuestMemoryError`` if not all inside
        one region or if the range wraps 2^64."""
        end = addr + length
        if addr >= self._base0 and end <= self._end0 and length >= 0:
            off = addr - self._base0
            return self._view0[off : off + length]
        return self._slow_view(addr, length, end)

    def _slow_view(self, addr, length, end):
        if addr < 0 or length < 0:
            raise GuestMemoryError(f"negative guest range {addr:#x}+{length:#x}")
        if end > _U64_LIMIT:
            raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} wraps past 2^64")
        i = bisect.bisect_right(self._bases, addr) - 1
        if i >= 0 and end <= self._ends[i]:
            off = addr - self._bases[i]
            return self._views[i][off : off + length]
        raise GuestMemoryError(f"guest range {addr:#x}+{length:#x} is not inside guest memory")

    def contains(self, addr: int, length: int) -> bool:
        try:
            self.view(addr, length)
        except GuestMemoryError:
            return False
        return True

    def read(self, addr: int, length: int) -> bytes:
        """A bytes copy of guest memory (for tests and drivers; the device uses ``view``)."""
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: Any) -> None:
        """Copy ``data`` into guest memory at ``addr``."""
        data = memoryview(data).cast("B")
        self.view(addr, len(data))[:] = data

"""The guest-side test driver's allocator: guest memory for rings, per-head slots, indirect
tables and data buffers, handed out from one window (``vblock.virtio.driver``).

Contract. Addresses are guest-physical and sizes in bytes. Blocks come in size classes, powers of
two of at least 64 bytes, each aligned to its size up to 4096; a freed block is reused for its
class and the window never shrinks back. The allocator only hands out addresses: it neither reads
nor writes guest memory, and ``MemoryError`` says the window is used up. Not thread-safe: it
belongs to one ``Driver``, which runs on one thread.
"""

from __future__ import annotations

__all__ = ["GuestAllocator"]


class GuestAllocator:
    """Size-class allocator over a window of guest memory: blocks are powers of two (at least
    64 bytes), aligned to their size up to 4096; freed blocks are reused per class."""

    def __init__(self, base, size):
        self.base = base
        self.end = base + size
        self._next = base
        self._free = {}

    def alloc(self, nbytes):
        cls = 64
        while cls < nbytes:
            cls <<= 1
        free = self._free.get(cls)
        if free:
            return free.pop()
        align = cls if cls < 4096 else 4096
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + cls > self.end:
            raise MemoryError(f"guest arena exhausted allocating {nbytes} bytes")
        self._next = addr + cls
        return addr

    def free(self, addr, nbytes):
        cls = 64
        while cls < nbytes:
            cls <<= 1
        self._free.setdefault(cls, []).append(addr)

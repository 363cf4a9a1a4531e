"""L1/L2 table codec and table I/O: the only place that converts table byte order.

In memory a table is an ``array('Q')`` of CPU-endian u64 entries (``Geometry.table_entries`` of
them); on disk it is ``table_size`` clusters of little-endian u64. Writes cover only the entries
that changed, rounded out to the host alignment (at least 512 bytes, as QEMU's sector writes).

The codec functions are sans-I/O; ``TableIO`` does the reads and writes through a ``HostFile``
with buffers from ``f.alloc`` so they are valid O_DIRECT I/O.
"""

from __future__ import annotations

import sys
from array import array

_SWAP = sys.byteorder != "little"
ENTRY_BYTES = 8


def decode(data) -> array:
    """Little-endian table bytes -> array('Q')."""
    table = array("Q")
    table.frombytes(data)
    if _SWAP:
        table.byteswap()
    return table


def encode(table) -> bytes:
    """array('Q') (or any sequence of ints) -> little-endian bytes."""
    out = table if isinstance(table, array) else array("Q", table)
    if _SWAP:
        out = array("Q", out)
        out.byteswap()
    return out.tobytes()


def new_table(entries: int) -> array:
    return array("Q", bytes(entries * ENTRY_BYTES))


def slice_bounds(first: int, last: int, table_entries: int, align: int) -> tuple[int, int]:
    """Entry range [first, last) rounded out so that its byte range is ``align``-aligned
    (``align`` is clamped to the table's size). Returns entry indexes [start, end)."""
    per = max(1, min(align, table_entries * ENTRY_BYTES) // ENTRY_BYTES)
    start = first // per * per
    end = min(table_entries, -(-last // per) * per)
    return start, end


def encode_slice(table, first: int, last: int, align: int, overlay=None) -> tuple[int, bytes]:
    """Bytes to write for entries [first, last) changed: (byte offset in the table, bytes), with
    ``overlay`` (index -> value) applied on top of ``table`` without modifying it."""
    start, end = slice_bounds(first, last, len(table), align)
    part = table[start:end]
    if overlay:
        for index, value in overlay.items():
            if start <= index < end:
                part[index - start] = value
    return start * ENTRY_BYTES, encode(part)


class TableIO:
    """Reads tables and writes whole ones through the image's HostFile (blocking: pool threads,
    open and repair). Slice updates on the request path are submitted by the driver's table
    writer (``writer.TableWriter``) with ``encode_slice``."""

    def __init__(self, hostfile, table_bytes: int, align: int, events=None):
        self.f = hostfile
        self.table_bytes = table_bytes
        self.align = max(512, align)
        self.events = events  # callable(name) for fault points: "L1_UPDATE", "L2_LOAD", ...

    def _event(self, name):
        if self.events is not None:
            self.events(name)

    def read(self, offset: int) -> array:
        self._event("L2_LOAD")
        buf = self.f.alloc(self.table_bytes)
        n = self.f.pread(buf, offset)
        if n < self.table_bytes:
            buf[n:] = bytes(self.table_bytes - n)
        return decode(buf)

    def write_bytes(self, table_offset: int, byte_offset: int, data: bytes, event: str) -> None:
        self._event(event)
        buf = self.f.alloc(len(data))
        buf[:] = data
        self.f.pwrite(buf, table_offset + byte_offset)

    def write_whole(self, table_offset, table, event="L2_ALLOC"):
        self.write_bytes(table_offset, 0, encode(table), event)

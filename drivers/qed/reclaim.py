"""Reclamation: compact a QED image so that it holds its header, tables and data and nothing else.

QEMU's QED check counts every unreferenced cluster between the header and the end of the file as a
leak, holes included, so punching holes is not enough: the file must end after its last used
cluster with no gap below. ``compact.plan`` fills holes from the end but cannot place an L2 table
(``table_size`` contiguous clusters) where the holes are scattered, and never moves the L1. This
module guarantees the end state for images with ``header_size`` 1:

1. the tables get a window of whole table slots right after the header: data clusters found
   there are evicted into holes (or past the end when there is none yet);
2. the L2 tables, then the L1, move into free slots;
3. data clusters at or past the final length ``N = 1 + table_size * tables + data clusters``
   move into the holes below it, highest first;
4. the file is truncated to ``N`` clusters.

Every move copies first, flushes, then rewrites its one pointer (an L2 or L1 entry, or
``l1_table_offset`` in the header) and flushes, so a crash leaves the old or the new pointer, each
to complete data; running again starts from whatever it finds. Writes are read-modify-write of
the host file's alignment (a pointer update rewrites the unchanged bytes around it). Named I/O
points (``RECLAIM_*``) label the writes for fault tests.
"""

from __future__ import annotations

import struct

from vblock.errors import UnsupportedError

from . import format as fmt

__all__ = ["Writer", "reclaim_file", "repair"]

SECTOR = 512


class Writer:
    """Aligned, counting writes over a host file (``bytes_written``)."""

    def __init__(self, f):
        self.f = f
        self.align = max(1, getattr(f, "alignment", 1)) if getattr(f, "direct", False) else 1
        self.bytes_written = 0

    def read(self, offset, length):
        a = self.align
        lo, hi = offset // a * a, -(-(offset + length) // a) * a
        buf = self.f.alloc(hi - lo)
        n = self.f.pread(buf, lo)
        data = bytes(buf[: max(0, n)]).ljust(hi - lo, b"\0")
        return data[offset - lo : offset - lo + length]

    def write(self, offset, data, point):
        from vblock.hostio import announce

        announce(point)
        a = self.align
        lo, hi = offset // a * a, -(-(offset + len(data)) // a) * a
        buf = self.f.alloc(hi - lo)
        if lo != offset or hi != offset + len(data):
            buf[:] = self.read(lo, hi - lo)
        buf[offset - lo : offset - lo + len(data)] = data
        self.f.pwrite(buf, lo)
        self.bytes_written += len(data)

    def flush(self):
        self.f.flush()


def reclaim_file(w, progress=None, clear_need_check=True):
    """Compact the QED image written through ``w`` (a ``Writer``); returns ``(clusters moved,
    final length in clusters)``. ``progress(done, total)`` as clusters move."""
    f = w.f
    head = w.read(0, SECTOR)
    h = fmt.validate(head[: fmt.HEADER_SIZE].ljust(fmt.HEADER_SIZE, b"\0"), f.size, f.path)
    cs, ts = h.cluster_size, h.table_size
    if h.header_size != 1:
        raise UnsupportedError(f"{f.path}: reclaiming needs header_size 1")
    entries = ts * cs // 8
    tbytes = ts * cs

    def read_table(off):
        return list(struct.unpack(f"<{entries}Q", w.read(off, tbytes)))

    l1_off = h.l1_table_offset
    l1 = read_table(l1_off)
    l2 = {i: read_table(off) for i, off in enumerate(l1) if off}
    data = {}  # host cluster -> (l1 index, l2 index)
    for i, table in l2.items():
        for k, e in enumerate(table):
            if e > 1:
                data[e // cs] = (i, k)
    ntables = len(l2) + 1
    window_end = 1 + ts * ntables
    n_final = window_end + len(data)
    tables = {i: l1[i] // cs for i in l2}  # l1 index -> first cluster
    tables[None] = l1_off // cs  # the L1

    def used_by_tables():
        out = set()
        for first in tables.values():
            out.update(range(first, first + ts))
        return out

    moved = 0

    # 1. Evict data clusters out of the table window, into holes in [window_end, n_final).
    def holes(lo, hi):
        taken = used_by_tables() | set(data)
        return [c for c in range(lo, hi) if c not in taken]

    in_window = sorted(c for c in data if 1 <= c < window_end)
    if in_window:
        free = holes(window_end, n_final)
        extra = max(n_final, -(-f.size // cs))
        moves = []
        for c in in_window:
            if free:
                dest = free.pop(0)
            else:  # no hole below N yet: past the end, moved down again in step 3
                dest = extra
                extra += 1
            moves.append((c, dest))
        moved += _move_data(w, cs, ts, entries, l1, l2, data, moves)
    # 2. Tables into free slots of the window: the L2 tables (copies, flush, L1 entries, flush),
    #    then the L1 (copy, flush, header, flush).
    slots = [1 + ts * k for k in range(ntables)]
    staying = {k for k, t in tables.items() if t in slots}
    taken = {tables[k] for k in staying}
    pending = []
    for key in sorted((k for k in tables if k not in staying), key=lambda k: (k is None, k or 0)):
        dest = next(t for t in slots if t not in taken)
        taken.add(dest)
        pending.append((key, tables[key], dest))
    l2_moves = [m for m in pending if m[0] is not None]
    if l2_moves:
        for _key, first, dest in l2_moves:
            w.write(dest * cs, w.read(first * cs, tbytes), "RECLAIM_TABLE_COPY")
        w.flush()
        for key, _first, dest in l2_moves:
            l1[key] = dest * cs
            w.write(l1_off + key * 8, struct.pack("<Q", dest * cs), "RECLAIM_L2_MOVE")
            tables[key] = dest
        w.flush()
        moved += ts * len(l2_moves)
    for key, first, dest in pending:
        if key is not None:
            continue
        w.write(dest * cs, w.read(first * cs, tbytes), "RECLAIM_TABLE_COPY")
        w.flush()
        sector = bytearray(w.read(0, SECTOR))
        h = h.with_(l1_table_offset=dest * cs)
        h.pack_into(sector, 0)
        w.write(0, bytes(sector), "RECLAIM_L1_MOVE")
        w.flush()
        l1_off = dest * cs
        tables[None] = dest
        moved += ts
    if progress is not None:
        progress(moved, n_final)
    # 3. Data clusters past N into the holes below it, highest first.
    high = sorted((c for c in data if c >= n_final), reverse=True)
    if high:
        free = holes(window_end, n_final)
        moved += _move_data(w, cs, ts, entries, l1, l2, data, list(zip(high, free)))
    # 4. Truncate, then clear need-check.
    f.truncate(n_final * cs)
    w.flush()
    if clear_need_check and h.need_check:
        sector = bytearray(w.read(0, SECTOR))
        h = h.with_(features=h.features & ~fmt.F_NEED_CHECK)
        h.pack_into(sector, 0)
        w.write(0, bytes(sector), "RECLAIM_DONE")
        w.flush()
    return moved, n_final


def _move_data(w, cs, ts, entries, l1, l2, data, moves) -> int:
    """Copy data clusters (src, dest), flush, then repoint their L2 entries, flush."""
    if not moves:
        return 0
    for src, dest in moves:
        w.write(dest * cs, w.read(src * cs, cs), "RECLAIM_DATA_COPY")
    w.flush()
    for src, dest in moves:
        i, k = data.pop(src)
        l2[i][k] = dest * cs
        data[dest] = (i, k)
        w.write(l1[i] + k * 8, struct.pack("<Q", dest * cs), "RECLAIM_DATA_MOVE")
    w.flush()
    return len(moves)


def repair(st, growth):
    """Reclaim inside an open image's repair (``check.check_image``; need-check set, nothing in
    flight): compact, then reload what ``st`` (the ``QedState``) keeps of the header and the L1,
    and tell ``growth`` the file's new length. Returns the clusters moved."""
    if st.header.header_size != 1:
        return 0
    w = Writer(st.f)
    moved, _ = reclaim_file(w, clear_need_check=False)
    head = w.read(0, fmt.HEADER_SIZE)
    length = st.f.size
    h = fmt.Header.unpack(head)
    with st.header_lock:
        st.header = h
        if st.head_area is not None:
            st.head_area[: fmt.HEADER_SIZE] = head
    st.l1[:] = st.tio.read(h.l1_table_offset)  # the same array, as QedState promises
    st.l1_entry.offset = h.l1_table_offset
    st.file_size = st.geo.round_down_to_cluster(length)
    with growth.lock:
        growth.file_length = length
    with st.lock:
        st.forget_hosts()
    return moved

"""Compaction: how repair gives leaked clusters back without leaving holes.

After a crash, clusters that were allocated but never linked (their L2 or L1 update was lost) are
leaks. Trailing leaks are simply truncated away; interior leaks would stay as dead space, and a
guest that keeps crashing its host process could grow the file without bound. Repair therefore
moves the clusters at the end of the file into the interior leaks, lowest leak first, and then
truncates: afterwards the file holds exactly its metadata and referenced clusters.

``plan`` is sans-I/O: from the leaked cluster indexes and the owners of the clusters above the
lowest leak it returns the moves. The driver executes them in a crash-safe order:

1. copy every moved data cluster to its new place, flush;
2. point the L2 entries at the copies (whole tables rewritten), flush;
3. copy every moved L2 table (with those updated entries) to its new place, flush;
4. point the L1 entries at the moved tables, flush;
5. truncate the file after the last referenced cluster.

A crash between steps leaves either the old or the new pointer, each to complete data; the
need-check bit stays set during repair, so the next open repairs again.

``execute`` carries out steps 1-4 on an open image (``state.QedState``); the repair in
``check.py`` truncates afterwards. Contract: it runs on the repairing thread with no request in
flight and the need-check bit already durable, blocks on I/O, and takes ``QedState.lock`` only
to drop the cached tables it rewrote.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .format import ZERO_CLUSTER


@dataclass
class Moves:
    data: list = field(default_factory=list)  # (from_index, to_index, l2_offset, l2_index)
    tables: list = field(default_factory=list)  # (from_index, to_index, l1_index)
    end: int = 0  # cluster index the file ends at after the moves


def plan(leaked, nclusters, table_size, owner):
    """Plan moves that fill interior leaks with clusters from the end of the file.

    ``leaked``: sorted leaked cluster indexes; ``nclusters``: clusters in the file;
    ``owner(i)``: for a used cluster ``i``, ``("data", l2_offset, l2_index)`` or
    ``("table", l1_index, first_cluster_index)``, or None for clusters that never move (the
    header and the L1 table). Returns ``Moves``; ``end`` is where the file may be truncated.
    """
    free = sorted(leaked)
    free_set = set(free)
    moves = Moves()
    top = nclusters - 1
    placed = set()  # destinations already filled
    lo = 0  # index into free of the lowest still-free cluster
    while top >= 0:
        while lo < len(free) and free[lo] not in free_set:
            lo += 1
        if lo >= len(free) or free[lo] >= top:
            break
        if top in free_set:
            free_set.discard(top)  # a leak at the end: truncated, not filled
            top -= 1
            continue
        if top in placed:
            top -= 1  # already holds a cluster moved here, into the lowest hole of its time
            continue
        who = owner(top)
        if who is None:
            break
        if who[0] == "data":
            dest = free[lo]
            free_set.discard(dest)
            placed.add(dest)
            moves.data.append((top, dest, who[1], who[2]))
            top -= 1
            continue
        # An L2 table: its clusters are [first, first + table_size); it moves only into a run of
        # table_size free clusters below it.
        first = who[2]
        dest = _free_run(free, free_set, table_size, first)
        if dest is None:
            break
        for i in range(dest, dest + table_size):
            free_set.discard(i)
            placed.add(i)
        moves.tables.append((first, dest, who[1]))
        top = first - 1
    # The file ends after the highest cluster still in use.
    leaked_set = set(free)
    moved = {m[0] for m in moves.data}
    for src, _, _ in moves.tables:
        moved.update(range(src, src + table_size))
    end = nclusters
    while end > 0 and (end - 1 not in placed) and (end - 1 in leaked_set or end - 1 in moved):
        end -= 1
    moves.end = end
    return moves


def _free_run(free, free_set, length, below):
    """The lowest start of ``length`` consecutive free clusters ending at or before ``below``."""
    run_start, run_len = None, 0
    for i in free:
        if i >= below:
            break
        if i not in free_set:
            run_start, run_len = None, 0
            continue
        if run_start is not None and i == run_start + run_len:
            run_len += 1
        else:
            run_start, run_len = i, 1
        if run_len == length:
            return run_start
    return None


def execute(st, leaked):
    """Move clusters from the end of the image file into the ``leaked`` ones (sorted cluster
    indexes), in the crash-safe order of the module docstring."""
    geo = st.geo
    cs = geo.cluster_size
    lowest = leaked[0]
    owners = {}
    for l1i, l2off in enumerate(st.l1):
        if not l2off:
            continue
        first = l2off // cs
        if first + geo.table_size > lowest:
            for k in range(geo.table_size):
                owners[first + k] = ("table", l1i, first)
        for l2i, entry in enumerate(st.tio.read(l2off)):
            if entry > ZERO_CLUSTER and entry // cs >= lowest:
                owners[entry // cs] = ("data", l2off, l2i)
    moves = plan(leaked, st.file_size // cs, geo.table_size, owners.get)
    if not moves.data and not moves.tables:
        return
    f = st.f
    if moves.data:
        buf = f.alloc(cs)
        for src, dst, _, _ in moves.data:
            f.pread(buf, src * cs)
            f.pwrite(buf, dst * cs)
        f.flush()
        by_table = {}
        for _, dst, l2off, l2i in moves.data:
            by_table.setdefault(l2off, []).append((l2i, dst * cs))
        for l2off, items in by_table.items():
            table = st.tio.read(l2off)
            for l2i, new in items:
                table[l2i] = new
            st.tio.write_whole(l2off, table, "L2_REPAIR")
        f.flush()
    if moves.tables:
        buf = f.alloc(geo.table_bytes)
        for src, dst, _ in moves.tables:
            f.pread(buf, src * cs)
            f.pwrite(buf, dst * cs)
        f.flush()
        for _, dst, l1i in moves.tables:
            st.l1[l1i] = dst * cs
        st.tio.write_whole(st.header.l1_table_offset, st.l1, "L1_REPAIR")
        f.flush()
    with st.lock:
        st.forget_hosts()

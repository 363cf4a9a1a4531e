"""Allocating writes: which clusters, which table updates, and in what durable order.

Theory of operation
-------------------
QED allocates by appending: a new data cluster or L2 table goes at the end of the file (the file
length rounded down to a cluster, ``file_size``), and whether a cluster is in use follows only from
the tables that point at it. Every crash point must leave an image that ``check`` can repair
without losing flushed data, so each allocating write makes its pieces durable in this order::

    need-check bit set and flushed (once, before the first allocation of a session; QEMU sets
    it only without a backing file and does not flush it, §15e)
      -> data (guest bytes, plus head/tail copied from the backing file when there is one)
      -> flush, if there is a backing file (else an L2 entry could hide backing data that
         never reached the new cluster)
      -> L2 entries (a new L2 table is written whole, then flushed)
      -> L1 entry (only for a new L2 table)

QEMU runs one allocating request at a time for the whole image. Here the plan is made under
``QedState.lock`` (a few dictionary operations, no I/O) and everything after runs in parallel:

1. **Plan** (``plan``, sans-I/O, under the lock): the clusters the run touches are checked against
   ``pending`` (guest clusters some request is allocating right now); if one is pending the request
   waits for it and looks again, so a cluster is never allocated twice. Otherwise the data clusters
   are taken from ``file_size``, then, if the L1 entry is 0 and nobody is creating that table, a new
   L2 table right after them. Every touched guest cluster is marked pending.
2. **Data**: the file is first extended to cover the new clusters (``growth.py``: never
   shrinking, so parallel allocations finishing out of order cannot cut each other off, and ahead
   in steps, because file systems serialise writes that extend a file). Then the data is written.
   Zero padding is not written at all: the clusters lie past the old end of file, so the file
   system already reads them as zeros. Only backing-file content is copied.
3. **Table update** (``writer.TableWriter.update``): the new entries join the table's queue. If no
   write of that table is in flight, this request starts its writer, which then runs on I/O
   completions, batch after batch, until the queue is empty; each batch covers the changed entries
   rounded out to whole file-system blocks, so updates that land in one table while a write is in
   flight are coalesced into the next single write. A new table's first batch is the whole table,
   flushed, followed by its L1 entry (the L1 table has a writer queue of its own). A batch becomes
   visible in the cached table only after its write completed: a reader sees either the old entry
   (old data) or the new one (whose data is already in the file), never a cluster not yet written.
4. **Finish**: the pending marks go, waiters retry and find the clusters allocated.

Without a backing file no flush separates data from its L2 entries, so their order on disk was
never guaranteed: either may land first, and an entry whose data did not arrive points past the
old end of file, into space that reads as zeros (the cluster's old content). The inline executor
therefore issues the data write and the table update together (``WriteBackAllocation``). The
updates are *hidden* meanwhile: written with every write of the table (``Entry.hidden``) but
invisible to lookups until the data write is over, so step 3's rule (never a cluster not yet
written) still holds for readers. Once the data is written the entries are shown and the request
completes, even if its table write is still in flight (write-back: the metadata is made durable
by the next flush, which waits for it, as a disk's volatile cache or qcow2's L2 cache do). This
takes the table write off the request's path; the gain is largest with submission polling off
(``VBLOCK_POLL_DEPTH=0``). A table write that fails after the acknowledgement fails every later
flush (the writer's sticky metadata error).

Two executors share these steps (``Allocator``). The inline one (``Allocator.inline``: table
cached, need-check already set) plans in the calling thread and lets I/O completions carry steps
2-4 (backing-file reads, data, the flush, the table update), with no thread hop. The pool one
(``Allocator.allocate``) does the rest: loading tables, setting need-check, zero markers.
Concurrent allocations share their flushes (``writer.TableWriter.ordered_flush``): each waits for
a flush that started after its data was written, and one flush serves everyone who arrived
meanwhile. A pool thread blocks only on work that a running thread or an I/O completion owns, so
a bounded pool cannot deadlock.

Contract: ``Allocator.claim`` and the bookkeeping at the end (``ended``, ``unpend``) run under
``QedState.lock``; planning is the only other thing done under it. ``allocate`` runs on a pool
thread and blocks; ``inline`` runs on the calling thread and waits for no data or table write
(it may grow the file first, ``growth.py``); completions of both run on I/O completion threads.
Every allocation is counted in ``QedState.allocs_in_flight`` from its claim to its end, and
inline ones in ``QedState.inflight`` too, so that close, check and the need-check clear wait for
them.
"""

from __future__ import annotations

from dataclasses import dataclass

from vblock.future import Future, join

from . import lookup, tables
from .cache import LOADING
from .format import ZERO_CLUSTER, Geometry
from .writer import completer


@dataclass
class Plan:
    """One allocating run, clamped to one L2 region. Offsets in bytes."""

    pos: int  # guest offset where the request's bytes start
    length: int  # guest bytes of the request in this run
    cluster_start: int  # guest offset of the first touched cluster
    nclusters: int  # clusters touched
    host_offset: int | None  # file offset of the first new data cluster; None for zero markers
    l2_offset: int | None  # file offset of a new L2 table, else None
    file_size: int  # the allocation pointer after this plan

    def guest_clusters(self, geo: Geometry):
        first = self.cluster_start >> geo.cluster_bits
        return range(first, first + self.nclusters)

    def entries(self, geo: Geometry) -> dict:
        """L2 index -> new entry value for every touched cluster."""
        first = (self.cluster_start >> geo.cluster_bits) & geo.l2_mask
        if self.host_offset is None:
            return {first + i: ZERO_CLUSTER for i in range(self.nclusters)}
        cs = geo.cluster_size
        return {first + i: self.host_offset + i * cs for i in range(self.nclusters)}

    @property
    def head(self):
        """(guest offset, bytes) before the request in the first cluster."""
        return self.cluster_start, self.pos - self.cluster_start

    def tail(self, geo: Geometry):
        """(guest offset, bytes) after the request up to the end of the last cluster."""
        end = self.pos + self.length
        return end, self.cluster_start + self.nclusters * geo.cluster_size - end


def plan(geo: Geometry, file_size: int, pos: int, length: int, zero: bool, need_table: bool):
    """Plan one allocating run: data clusters (unless ``zero``: markers only) from ``file_size``,
    then a new L2 table when ``need_table``. ``pos``/``length`` lie in one L2 region; a zero
    run must be cluster-aligned."""
    cs = geo.cluster_size
    cluster_start = pos & ~geo.cluster_mask
    nclusters = geo.bytes_to_clusters(pos + length - cluster_start)
    host = None
    if not zero:
        host = file_size
        file_size += nclusters * cs
    l2_offset = None
    if need_table:
        l2_offset = file_size
        file_size += geo.table_bytes
    return Plan(pos, length, cluster_start, nclusters, host, l2_offset, file_size)


class Allocator:
    """Carries out allocation plans for one image: claims clusters, writes data, queues the table
    updates, and ends each allocation (see the module docstring for the order and the locks)."""

    def __init__(self, st, writer, growth, needcheck):
        self.st = st
        self.writer = writer
        self.growth = growth
        self.needcheck = needcheck

    # -- the pool executor ---------------------------------------------------------------------
    def allocate(self, l1_index, entry, pos, n, views, kind):
        """Pool thread: allocate and write one run (``views`` None: zero markers). ``entry`` is
        the held table of ``l1_index`` (None on an L1 miss) and (``kind``, ``n``) what the
        caller's lookup found at ``pos``. Returns False when the tables changed under us and the
        caller must look again."""
        st = self.st
        geo = st.geo
        zero = views is None
        with st.lock:
            # The table may have changed since the lookup: recheck under the lock.
            if st.l1[l1_index] == 0:
                current = st.creating.get(l1_index)
            else:
                current = st.cache.get(st.l1[l1_index])
            if current is not entry:
                return False
            table = entry.table if entry is not None else None
            k2, n2, _ = lookup.find_run(geo, table, pos, n, st.file_size)
            if k2 is not kind or n2 != n:
                return False
            busy, claim = self.claim(l1_index, entry, pos, n, zero)
        if busy is not None:
            busy.exception()  # wait; its outcome is the other request's business
            return False
        p, entry, done = claim
        ok = False
        try:
            # Set with or without a backing file (QEMU sets it only without one): a crash can
            # leak clusters either way, and only a repair at the next open gives them back.
            self.needcheck.ensure()
            if not zero:
                self._write_data(p, views, kind)
            self.writer.update(entry, p.entries(geo), "L2_UPDATE").result()
            ok = True
        finally:
            self.end(p, entry, done, ok)
        return True

    def _write_data(self, p, views, kind):
        st = self.st
        self.growth.extend(p.host_offset + p.nclusters * st.geo.cluster_size)
        start, iov, fills = self.layout(p, views, kind)
        for pos, buf in fills:
            fut = st.read_backing(pos, [buf], len(buf))
            if fut is not None:
                fut.result()
        st.event("DATA_WRITE")
        st.f.submit_write(start, iov).result()
        if st.backing is not None and not st.unsafe:
            fut = Future()
            self.writer.ordered_flush(completer(fut))
            fut.result()

    # -- claims and their end ------------------------------------------------------------------
    def claim(self, l1_index, entry, pos, n, zero):
        """Under ``QedState.lock``: claim the clusters of [pos, pos+n) for one allocation.
        Returns (the future of an allocation already holding one of them, None), or (None, (plan,
        the held table entry, the future that completes when this allocation ends)); a new L2
        table is created when ``entry`` is None (L1 miss)."""
        st = self.st
        geo = st.geo
        pending = st.pending
        for c in range(pos >> geo.cluster_bits, ((pos + n - 1) >> geo.cluster_bits) + 1):
            busy = pending.get(c)
            if busy is not None:
                return busy, None
        p = plan(geo, st.file_size, pos, n, zero, entry is None)
        st.file_size = p.file_size
        if entry is None:
            entry = st.cache.create(p.l2_offset, tables.new_table(geo.table_entries), l1_index)
            st.creating[l1_index] = entry
        else:
            st.cache.hold(entry)
        done = Future()
        for c in p.guest_clusters(geo):
            pending[c] = done
        st.allocs_in_flight += 1
        return None, (p, entry, done)

    def end(self, p, entry, done, ok, counted=False):
        """An allocation is over (written or failed): drop its pending marks and its hold. A
        failed one may have left clusters allocated but unlinked: the need-check bit then stays
        set until the image is repaired (at the next read-write open). ``counted``: the
        allocation is one of the tracked requests itself (inline allocations are)."""
        with self.st.lock:
            idle = self.ended(p, entry, done, ok, counted)
        done.set_result(None)
        if idle:
            self.needcheck.arm()

    def unpend(self, p, done):
        """Under ``QedState.lock``: drop the pending marks that ``done`` holds on the clusters of
        ``p`` (the caller completes ``done`` outside the lock, so that waiters look again)."""
        pending = self.st.pending
        for c in p.guest_clusters(self.st.geo):
            if pending.get(c) is done:
                del pending[c]

    def ended(self, p, entry, done, ok, counted):
        """Under ``QedState.lock``: the bookkeeping of ``end`` (pending marks of ``done``, none
        when it is None); returns whether the need-check idle countdown must start (after
        ``done`` is completed, outside the lock)."""
        st = self.st
        if done is not None:
            self.unpend(p, done)
        st.allocs_in_flight -= 1
        st.cache.release(entry)
        if not ok:
            st.damaged = True
        if counted:
            st.untracked()
        return st.allocs_in_flight == 0 and not st.damaged

    # -- the inline executor -------------------------------------------------------------------
    def inline(self, offset, buffers, length):
        """The allocating write without a thread hop: when the table is cached (or the L1 entry is
        0), need-check is already set and no cluster of the run is being allocated, plan under the
        lock and let I/O completions carry the rest (backing-file reads for the head and tail,
        data, a shared flush when there is a backing file, then the table update). Returns None
        when the request needs the pool; else the request's future (tracked until it ends)."""
        st = self.st
        geo = st.geo
        l1_index = offset >> geo.l1_shift
        with st.lock:
            if st.need_check_change is not None or not st.header.need_check:
                return None
            l2off = st.l1[l1_index]
            if l2off:
                entry = st.cache.get(l2off)
                if entry is None or entry.state is LOADING:
                    return None
                table = entry.table
            else:
                entry = st.creating.get(l1_index)
                table = entry.table if entry is not None else None
            kind, n, _ = lookup.find_run(geo, table, offset, length, st.file_size)
            if n != length or (kind is not lookup.UNALLOCATED and kind is not lookup.ZERO):
                return None
            busy, claim = self.claim(l1_index, entry, offset, length, False)
            if busy is not None:
                return None  # another request is allocating there: wait on the pool
            st.inflight += 1  # tracked as a request until end() (close waits for it)
        p, entry, done = claim
        out = Future()

        if st.backing is None:
            return WriteBackAllocation(self, p, entry, done, out, length).start(buffers)

        def finish(exc):
            self.end(p, entry, done, exc is None, counted=True)
            if exc is None:
                out.set_result(length)
            else:
                out.set_exception(exc)

        entries = p.entries(geo)

        def ordered(exc):
            if exc is None:
                self.writer.update(entry, entries, "L2_UPDATE", finish)
            else:
                finish(exc)

        def written(f):
            exc = f.exception()
            if exc is None and st.backing is not None and not st.unsafe:
                self.writer.ordered_flush(ordered)
            else:
                ordered(exc)

        def filled(f):
            exc = f.exception()
            if exc is not None:
                finish(exc)
                return
            try:
                st.event("DATA_WRITE")
                fut = st.f.submit_write(start, iov)
            except BaseException as e:
                finish(e)
                return
            fut.add_done_callback(written)

        try:
            self.growth.extend(p.host_offset + p.nclusters * geo.cluster_size)
            start, iov, fills = self.layout(p, buffers, kind)
            reads = [
                r
                for r in (st.read_backing(pos, [buf], len(buf)) for pos, buf in fills)
                if r is not None
            ]
        except BaseException as exc:
            finish(exc)
            return out
        join(reads, 0).add_done_callback(filled)
        return out

    def layout(self, p, views, kind):
        """Where the data write of plan ``p`` starts and its buffers: the guest's ``views``, plus
        head and tail buffers to fill from the backing file when the clusters were unallocated
        over one (listed as (guest offset, buffer) in the third element). Zero padding is never
        written: new clusters lie past the old end of file and read as zeros already."""
        st = self.st
        iov = list(views)
        start = p.host_offset + (p.pos - p.cluster_start)
        fills = []
        if kind is lookup.UNALLOCATED and st.backing is not None:
            backing_end = st.backing.size
            head_pos, head_len = p.head
            tail_pos, tail_len = p.tail(st.geo)
            if head_len and head_pos < backing_end:
                buf = st.f.alloc(head_len)
                iov.insert(0, buf)
                fills.append((head_pos, buf))
                start = p.host_offset
            if tail_len and tail_pos < backing_end:
                tail_len = min(tail_len, -(-(backing_end - tail_pos) // st.align) * st.align)
                buf = st.f.alloc(tail_len)
                iov.append(buf)
                fills.append((tail_pos, buf))
        return start, iov, fills


class WriteBackAllocation:
    """One inline allocating write without a backing file: the data write and the table update
    go out together, and the request is acknowledged as soon as its data is written (write-back
    metadata, as a disk with a volatile cache, or qcow2's L2 cache, acknowledges before its
    metadata is durable; a flush waits for the table write, see ``writer.TableWriter.flush``).

    Crash safety is unchanged, since no flush separated the two anyway (only a backing file's COW
    needs one): either may reach the disk first, and a table entry whose data did not arrive
    points past the old end of file, into space that reads as zeros, which is the cluster's old
    content. What changes is visibility: lookups must not find the new clusters before their data
    is written, so the updates stay hidden (written with every write of the table, invisible to
    lookups) until the data write is over. Then they are shown, the clusters are no longer
    pending, and the request completes, while the table write may still be in flight (except in
    a new table, which lookups find only once its L1 entry is written: there the request waits
    for the table write, L1 included). Until the table write ends, the allocation stays counted
    (``QedState.allocs_in_flight`` and ``inflight``: close, check and the need-check clear wait
    for it) and listed in ``QedState.unwritten`` (flushes wait for it).

    Failures: a failed data write fails the request, and the entries are shown only if the table
    write succeeded (the file's table then points there). A table write that fails before the
    data is written fails the request and forgets the entries. One that fails after the request
    was acknowledged leaves the entries shown in the cache but not in the file: the image stays
    marked for repair and every later flush fails with that error (``QedState.meta_error``).

    The two completions (data, table) may arrive on any I/O completion thread, in either order;
    they meet under ``QedState.lock``."""

    __slots__ = (
        "alloc",
        "p",
        "entry",
        "entries",
        "done",
        "out",
        "length",
        "left",
        "data_error",
        "table_error",
        "written",
    )

    def __init__(self, alloc, p, entry, done, out, length):
        self.alloc = alloc
        self.p = p
        self.entry = entry
        self.entries = p.entries(alloc.st.geo)
        self.done = done  # the allocation's pending mark
        self.out = out  # the request's future
        self.length = length
        self.left = 2
        self.data_error = self.table_error = None
        self.written = None  # Future of the table write once the request was acknowledged

    def start(self, buffers):
        alloc = self.alloc
        st = alloc.st
        p = self.p
        try:
            alloc.growth.extend(p.host_offset + p.nclusters * st.geo.cluster_size)
            # layout() without a backing file: the guest's buffers where the request starts
            st.event("DATA_WRITE")
            data = st.f.submit_write(p.host_offset + (p.pos - p.cluster_start), buffers)
        except BaseException as exc:  # the data write never started, nor the table update
            self.data_error = exc
            self.left = 1
            self._part(None)
            return self.out
        alloc.writer.update(self.entry, self.entries, "L2_UPDATE", self._table_done, hidden=True)
        data.add_done_callback(self._data_done)
        return self.out

    def _data_done(self, fut):
        self._part(fut.exception(), data=True)

    def _table_done(self, err):
        self._part(err)

    def _show(self, show):
        """Under the lock: make the entries visible to lookups (or only forget them)."""
        hidden = self.entry.hidden
        table = self.entry.table
        for i in self.entries:
            value = hidden.pop(i, None)
            if show and value is not None:
                table[i] = value

    def _part(self, err, data=False):
        alloc = self.alloc
        st = alloc.st
        written = None
        with st.lock:
            if data:
                self.data_error = err
            elif err is not None:
                self.table_error = err
            self.left -= 1
            if self.left:
                if not data or err is not None or self.table_error is not None or self.entry.new:
                    return  # (a new table: lookups find it only once its L1 entry is written)
                # The data is in the file and the table write is still going: acknowledge now.
                self._show(True)
                alloc.unpend(self.p, self.done)
                self.written = st.unwritten[self] = Future()
                exc = None
                idle = False
            elif self.written is not None:
                # The table write of an acknowledged request is over.
                del st.unwritten[self]
                written = self.written
                if err is not None and st.meta_error is None:
                    st.meta_error = err
                idle = alloc.ended(self.p, self.entry, None, err is None, True)
            else:
                # The table in the file holds the entries unless its write failed: show them (a
                # failed data write leaves allocated clusters that read zeros or part of the data).
                self._show(self.table_error is None)
                exc = self.data_error or self.table_error
                idle = alloc.ended(self.p, self.entry, self.done, exc is None, True)
        if written is not None:
            if err is None:
                written.set_result(None)
            else:
                written.set_exception(err)
        else:
            self.done.set_result(None)
            if exc is None:
                self.out.set_result(self.length)
            else:
                self.out.set_exception(exc)
        if idle:
            alloc.needcheck.arm()

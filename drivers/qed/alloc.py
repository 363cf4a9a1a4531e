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

QEMU runs one allocating request at a time for the whole image. Here the plan is made under the
driver lock (a few dictionary operations, no I/O) and everything after runs in parallel:

1. **Plan** (``plan``, sans-I/O, under the lock): the clusters the run touches are checked against
   ``pending`` (guest clusters some request is allocating right now); if one is pending the request
   waits for it and looks again, so a cluster is never allocated twice. Otherwise the data clusters
   are taken from ``file_size``, then, if the L1 entry is 0 and nobody is creating that table, a new
   L2 table right after them. Every touched guest cluster is marked pending.
2. **Data**: the file is first extended to cover the new clusters (under a small extend lock, never
   shrinking, so parallel allocations finishing out of order cannot cut each other off; without a
   backing file it grows ahead in steps, because file systems serialise writes that extend a
   file). Then the data is written. Zero padding is not written at all: the clusters lie past the
   old end of file, so the file system already reads them as zeros. Only backing-file content is
   copied.
3. **Table update** (``driver._update``): the new entries join the table's queue. If no write of
   that table is in flight, this request starts its writer, which then runs on I/O completions,
   batch after batch, until the queue is empty; each batch covers the changed entries rounded out
   to whole file-system blocks, so updates that land in one table while a write is in flight are
   coalesced into the next single write. A new table's first batch is the whole table, flushed,
   followed by its L1 entry (the L1 table has a writer queue of its own). A batch becomes visible
   in the cached table only after its write completed: a reader sees either the old entry (old
   data) or the new one (whose data is already in the file), never a cluster not yet written.
4. **Finish**: the pending marks go, waiters retry and find the clusters allocated.

Without a backing file no flush separates data from its L2 entries, so their order on disk was
never guaranteed: either may land first, and an entry whose data did not arrive points past the
old end of file, into space that reads as zeros (the cluster's old content). The inline executor
therefore issues the data write and the table update together (``driver._ConcurrentAlloc``). The
updates are *hidden* meanwhile: written with every write of the table (``Entry.hidden``) but
invisible to lookups until the data write is over, so step 3's rule (never a cluster not yet
written) still holds for readers. Once the data is written the entries are shown and the request
completes, even if its table write is still in flight (write-back: the metadata is made durable
by the next flush, which waits for it, as a disk's volatile cache or qcow2's L2 cache do). At 16
requests in flight this took allocating writes from 25-28k to 31-34k IOPS with the submission
polling off (``VBLOCK_POLL_DEPTH=0``), and about 5 % with it. A table write that fails after the
acknowledgement fails every later flush.

Two executors share these steps. The inline one (``driver._alloc_inline``: table cached,
need-check already set) plans in the calling thread and lets I/O completions carry steps 2-4
(backing-file reads, data, the flush, the table update), with no thread hop. The pool one
(``driver._allocate``) does the rest: loading tables, setting need-check, zero markers.
Concurrent allocations share their flushes (``driver._ordered_flush``): each waits for a flush
that started after its data was written, and one flush serves everyone who arrived meanwhile. A pool thread blocks only on work that a
running thread or an I/O completion owns, so a bounded pool cannot deadlock.
"""

from __future__ import annotations

from dataclasses import dataclass

from .format import ZERO_CLUSTER, Geometry


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


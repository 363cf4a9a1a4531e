"""The shared state of one open QED image: what the driver's modules read and change.

QEMU keeps one ``BDRVQEDState`` per image and hands it to every function in ``qed*.c``; this is
that object. ``driver.py`` builds it at open and passes it to the table writer (``writer.py``),
the allocator (``alloc.py``), need-check handling (``needcheck.py``), file growth
(``growth.py``), header updates (``header.py``) and repair (``check.py``, ``compact.py``). None of
them reaches into another's privates: what more than one of them touches lives here, and what
only one touches stays in that module's own object.

Fields, in bytes unless said otherwise:

* fixed at open: ``path``, ``read_only``, ``unsafe`` (cache="unsafe": flushes do nothing), ``geo``
  (``format.Geometry``), ``align`` (the host's request alignment), ``meta_align`` (table and header
  writes cover whole file-system blocks of this size), ``tio`` (``tables.TableIO``), ``l1`` (the
  L1 table, an ``array('Q')`` changed in place, never replaced), ``l1_entry`` (its writer queue),
  ``cache`` (``cache.L2Cache``), ``hosts`` (see ``learn_host``);
* ``f``: the image's ``HostFile``. Fixed while the image is open, except that tests swap it
  (through ``QedDriver.f``) to hold I/O;
* ``header`` (``format.Header``): replaced whole, never changed in place, under ``header_lock``;
  read without a lock. ``head_area``: the file's first ``meta_align`` bytes as last written, or
  None when that block is larger than 4 KiB (then a header write reads it first);
* ``backing``: the backing image, or None; replaced only by ``change_backing``;
* ``events``: callable(name) told of every named fault point (tests), or None.

Locks, and what each guards:

* ``lock``: the L2 cache (it shares this lock: every entry's state, holders, queues and hidden
  updates), ``pending``, ``creating``, ``allocs_in_flight``, ``damaged``, ``file_size``,
  ``inflight``, ``unwritten``, ``meta_error`` and ``need_check_change``. Held for bookkeeping
  only, never across I/O. The hot path does not take it: it reads ``l1``, ``file_size`` and the
  cache's final tables without it (``learn_host``). Repair (``check.py``) runs with no request
  in flight and changes ``file_size``, ``damaged`` and the tables without it too.
* ``inflight_cond``: a condition on ``lock``, notified when ``inflight`` drops to 0.
* ``header_lock``: serialises header writes and is held across that I/O (header writes are rare
  and synchronous); taken without ``lock`` held.
* ``growth.Growth`` and ``writer.TableWriter`` each have a lock of their own for their private
  state (the file's length, the ordered-flush round).
"""

from __future__ import annotations

import threading

from vblock.block.iov import slice_views, zero_fill
from vblock.errors import ImageError
from vblock.hostio import announce

from .cache import CLEAN, Entry, L2Cache
from .tables import TableIO

HOSTS_MAX = 32768  # clusters whose host offset ``learn_host`` remembers (2 GiB of 64 KiB ones)


class QedState:
    """One open image's shared state (see the module docstring for each field and its lock)."""

    __slots__ = (
        "path",
        "read_only",
        "unsafe",
        "f",
        "geo",
        "align",
        "meta_align",
        "header",
        "head_area",
        "backing",
        "events",
        "tio",
        "l1",
        "l1_entry",
        "lock",
        "cache",
        "hosts",
        "hosts_max",
        "file_size",
        "pending",
        "creating",
        "allocs_in_flight",
        "damaged",
        "inflight",
        "inflight_cond",
        "unwritten",
        "meta_error",
        "need_check_change",
        "header_lock",
    )

    def __init__(
        self,
        path,
        f,
        header,
        geo,
        *,
        read_only,
        unsafe,
        align,
        meta_align,
        head_area,
        file_size,
        l2_cache_size,
    ):
        """Reads the L1 table (blocking): the state of an image is complete once it is built."""
        self.path = path
        self.read_only = read_only
        self.unsafe = unsafe
        self.f = f
        self.geo = geo
        self.align = align
        self.meta_align = meta_align
        self.header = header
        self.head_area = head_area
        self.backing = None
        self.events = None
        self.header_lock = threading.Lock()
        self.lock = threading.Lock()
        self.cache = L2Cache(l2_cache_size, self.lock)
        # Guest cluster index -> host offset of an allocated cluster, as ``learn_host`` found it
        # in a cached table: the read and rewrite hot path (a request inside one cluster) looks
        # here first, without a lock. An allocated entry never changes while the image is open
        # except by repair and compaction (``check``), which clear this map with the cache;
        # eviction, discard and write_zeroes keep the mapping. Bounded by clearing it when full.
        self.hosts = {}
        self.hosts_max = HOSTS_MAX
        self.file_size = file_size  # the allocation pointer: where the next cluster goes
        self.pending = {}  # guest cluster index -> Future of the allocation that owns it
        self.creating = {}  # l1 index -> Entry of an L2 table being created
        self.allocs_in_flight = 0
        self.damaged = False  # a failed allocation may have leaked clusters: keep need-check set
        self.inflight = 0  # tracked requests (see ``track``)
        self.inflight_cond = threading.Condition(self.lock)
        # Write-back (``alloc.WriteBackAllocation``): acknowledged allocations whose table write
        # is still in flight, each with the future of that write; a flush waits for them first.
        self.unwritten = {}
        # The sticky metadata error: the first failed table write of an acknowledged allocation.
        # Every later flush fails with it, and so does close (see ``writer.TableWriter.flush``).
        self.meta_error = None
        self.need_check_change = None  # Future while the need-check bit is being set or cleared
        self.tio = TableIO(f, geo.table_bytes, meta_align, self.event)
        self.l1 = self.tio.read(header.l1_table_offset)
        self.l1_entry = Entry(header.l1_table_offset, CLEAN)
        self.l1_entry.table = self.l1

    def event(self, name):
        """A named fault point: labels this thread's next host writes for vblock.testing.faults,
        and tells ``events`` (tests)."""
        announce(name)
        if self.events is not None:
            self.events(name)

    # -- request tracking ----------------------------------------------------------------------
    def track(self, fut):
        """Count ``fut`` as in flight until it completes. Tracked: everything that may change
        metadata (allocations, slow-path work), which ``check`` and ``close`` wait for
        (``drain``). Data I/O on the fast path is not: as with raw images, callers finish their
        requests before close (the host file still waits for them)."""
        with self.inflight_cond:
            self.inflight += 1
        fut.add_done_callback(self._untrack)
        return fut

    def _untrack(self, fut):
        with self.inflight_cond:
            self.untracked()

    def untracked(self):
        """Under ``lock``: one tracked request is over."""
        self.inflight -= 1
        if not self.inflight:
            self.inflight_cond.notify_all()

    def drain(self):
        """Wait until no tracked request is in flight."""
        with self.inflight_cond:
            while self.inflight:
                self.inflight_cond.wait()

    # -- lookups -------------------------------------------------------------------------------
    def learn_host(self, index):
        """The host offset of guest cluster ``index`` if it is allocated and its table is cached
        (then ``hosts`` remembers it), else None: the general path decides. No lock, no I/O."""
        geo = self.geo
        l2off = self.l1[index >> geo.l2_bits]
        if not l2off:
            return None
        table = self.cache.peek(l2off)
        if table is None:
            return None
        host = table[index & geo.l2_mask]
        if host & geo.cluster_mask or not geo.header_bytes <= host < self.file_size:
            return None  # 0, 1 or invalid: the general path decides
        hosts = self.hosts
        if len(hosts) >= self.hosts_max:
            hosts.clear()
        hosts[index] = host
        return host

    def forget_hosts(self):
        """Under ``lock``: tables were rewritten (repair): drop the cached tables and mappings."""
        self.cache.clear()
        self.hosts.clear()

    def invalid(self, pos, host):
        """QEMU answers EINVAL; we name the structure at fault (the request still fails)."""
        return ImageError(
            self.path, "l2_table", f"invalid cluster offset {host:#x} for guest offset {pos}"
        )

    def read_backing(self, pos, views, n):
        """Read [pos, pos+n) from the backing image into ``views``; zeros past its end. Returns
        the read's future, or None when nothing was left to read."""
        inside = max(0, min(n, self.backing.size - pos))
        if inside < n:
            zero_fill(slice_views(views, inside, n - inside))
        if inside == 0:
            return None
        return self.backing.submit_read(pos, slice_views(views, 0, inside) if inside < n else views)

"""The QED driver: the operation table of ``vblock.block.interface`` over one open image.

Paths through a request:

* **Fast path** (calling thread, no thread hop, no lock): a read, or a write whose clusters are
  all allocated, whose L2 tables are cached (``L2Cache.peek``). Lookup, then submit to the host
  file. Reads of zero or unallocated clusters fill zeros or read the backing image inline.
* **Inline allocation** (calling thread, one lock): an allocating write whose table is cached,
  on an image whose need-check bit is already set: planned under the lock, then carried by I/O
  completions (backing reads, data, a shared flush with a backing file, the table update;
  ``alloc.py``).
* **Slow path** (``self.pool``): everything that must wait: loading an L2 table, setting the
  need-check bit, copying from the backing file, zero markers, discards.

State shared by requests (``l1``, the cache, ``file_size``, ``pending``, ``creating``, the header)
changes under ``self.lock``, which is never held across I/O.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from vblock.block.backing import backing_path
from vblock.block.interface import DATA, UNALLOCATED, ZERO, BlockDriver, Limits, Run
from vblock.errors import ImageError, UnsupportedError
from vblock.future import Future, completed, failed, followed_by, join, resolve, then
from vblock.hostio import announce, open_host_file
from vblock.hostio.engine import float_thread

from . import alloc, check as checkmod, compact, format as fmt, lookup, tables
from .cache import CLEAN, LOADING, WRITING, Entry, L2Cache, wait_loaded

_log = logging.getLogger("vblock.drivers.qed")

DEFAULT_L2_CACHE_SIZE = 64  # tables
DEFAULT_NEED_CHECK_TIMEOUT = 5.0  # seconds without allocation before the dirty bit is cleared
DEFAULT_POOL_SIZE = 32  # threads
HOSTS_MAX = 32768  # clusters whose host offset ``_learn_host`` remembers (2 GiB of 64 KiB ones)

_ZEROS = memoryview(bytes(1 << 20))  # sliced without copying


def _zero_fill(views):
    for v in views:
        n = len(v)
        pos = 0
        while pos < n:
            k = min(n - pos, len(_ZEROS))
            v[pos : pos + k] = _ZEROS[:k]
            pos += k


def _slice(views, skip, length):
    """The part [skip, skip+length) of the byte stream formed by ``views``."""
    if len(views) == 1:
        return [views[0][skip : skip + length]]
    out = []
    for v in views:
        n = len(v)
        if skip >= n:
            skip -= n
            continue
        take = min(n - skip, length)
        out.append(v[skip : skip + take])
        length -= take
        skip = 0
        if not length:
            break
    return out


def _wait_all(futures):
    err = None
    for f in futures:
        exc = f.exception()
        if exc is not None and err is None:
            err = exc
    if err is not None:
        raise err


class _IdleTimer:
    """One thread that runs ``action`` once ``timeout`` seconds pass after the last ``arm``."""

    def __init__(self, timeout, action):
        self.timeout = timeout
        self.action = action
        self.cond = threading.Condition()
        self.deadline = None
        self.stopped = False
        self.thread = None

    def arm(self):
        with self.cond:
            idle = self.deadline is None
            self.deadline = time.monotonic() + self.timeout
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="qed-need-check",
                                               daemon=True)
                self.thread.start()
            if idle:  # a waiting thread with a deadline wakes by itself and sees the new one
                self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def _run(self):
        float_thread()  # see Driver.pool: armed from a callback, it may start on a pinned worker
        while True:
            with self.cond:
                while not self.stopped and (
                    self.deadline is None or self.deadline > time.monotonic()
                ):
                    wait = None if self.deadline is None else self.deadline - time.monotonic()
                    self.cond.wait(wait)
                if self.stopped:
                    return
                self.deadline = None
            try:
                self.action()
            except Exception:  # logged; the bit stays set and is cleared at close
                _log.exception("clearing the QED need-check bit failed")


class QedDriver(BlockDriver):
    format_name = "qed"
    create_options = {
        "cluster_size": int,
        "table_size": int,
        "backing_file": str,
        "backing_fmt": str,
    }
    create_option_help = {
        "cluster_size": "cluster size in bytes: a power of two from 4 KiB to 64 MiB (default 64 KiB)",
        "table_size": "L1 and L2 table size in clusters: a power of two from 1 to 16 (default 4)",
        "backing_file": "file name of a base image",
        "backing_fmt": "image format of the base image",
    }
    open_options = {
        "l2_cache_size": int,  # tables
        "need_check_timeout": float,  # seconds; <= 0 disables the idle clear
        "pool_size": int,  # threads for slow-path work
    }

    # -- class-level operations ------------------------------------------------------------------
    @classmethod
    def probe(cls, head, path):
        return fmt.probe(head)

    @classmethod
    def create(cls, path, size, options):
        """Write the header and an empty L1 table, and make the file exactly that long.

        A block or character device is refused (``UnsupportedError``) before anything is written:
        QED allocates clusters at the end of its file, which it takes to be the file's length, so
        on a device every allocation would land past the device's end. Use raw on devices."""
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            mode = 0
        if stat.S_ISBLK(mode) or stat.S_ISCHR(mode):
            raise UnsupportedError(f"{path}: a QED image cannot be made on a device: QED allocates clusters "
                                   "at the end of its file, which a device cannot grow (use raw)")
        cs = options.get("cluster_size", fmt.DEFAULT_CLUSTER_SIZE)
        ts = options.get("table_size", fmt.DEFAULT_TABLE_SIZE)
        backing = options.get("backing_file") or None
        bfmt = options.get("backing_fmt")
        try:
            h, head = fmt.create_header(size, cs, ts, backing, bfmt)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if ts == 1:
            warnings.warn(f"{path}: QEMU cannot open QED images with table_size 1", stacklevel=2)
        elif ts >= 8:
            warnings.warn(
                f"{path}: QEMU corrupts QED images with table_size >= 8 on large writes",
                stacklevel=2,
            )
        f = open_host_file(path, direct=False, create=True)
        try:
            f.truncate(0)
            buf = f.alloc(4096)
            buf[: len(head)] = head
            f.pwrite(buf, 0)
            f.truncate(fmt.created_file_length(cs, ts))
            f.flush()
        finally:
            f.close()

    @classmethod
    def open(cls, path, options):
        return cls(path, options)

    # -- open --------------------------------------------------------------------------------------
    def __init__(self, path, options):
        self.path = os.fspath(path)
        self.read_only = bool(options.read_only)
        self.options = options
        dopts = options.driver_options
        self._unsafe = options.cache == "unsafe"
        self.f = open_host_file(
            self.path,
            direct="try" if options.direct else False,
            engine=options.aio,
            read_only=self.read_only,
        )
        self._backing = None
        self.pool = None
        self._closed = False
        self.damaged = False  # a failed allocation may have leaked clusters: keep need-check set
        try:
            self._open(dopts)
        except BaseException:
            self._teardown()
            raise

    def _open(self, dopts):
        f = self.f
        length = f.size
        self.align = align = max(512, f.alignment)
        # Metadata writes (tables, header) cover whole file-system blocks: a direct write smaller
        # than a block makes ext4 and XFS wait for every direct I/O in flight on the file.
        self.meta_align = max(4096, align)
        head = f.alloc(4096)
        n = f.pread(head, 0) if length else 0
        h = fmt.validate(head[: min(n, 4096)], length, self.path)
        geo = self.geo = fmt.Geometry.of(h)
        self.file_size = geo.round_down_to_cluster(length)  # allocation pointer, bytes
        # The header sector(s) we rewrite when the header changes: the first `align` bytes.
        self._head_area = bytearray(head[: self.meta_align]) if self.meta_align <= 4096 else None
        if h.features & fmt.F_BACKING_FILE:
            end = h.backing_filename_offset + h.backing_filename_size
            area = f.alloc(-(-end // align) * align)
            f.pread(area, 0)
            self.backing_filename = fmt.backing_name(h, area)
        else:
            self.backing_filename = None
        self.header = h
        self.size = h.image_size
        self.limits = Limits(
            request_alignment=align,
            mem_alignment=max(1, f.mem_alignment),
            max_transfer=1 << 30,
            discard_alignment=h.cluster_size,
            write_zeroes_alignment=h.cluster_size,
        )
        self.lock = threading.Lock()
        self.cache = L2Cache(dopts.get("l2_cache_size", DEFAULT_L2_CACHE_SIZE), self.lock)
        # Guest cluster index -> host offset of an allocated cluster, as ``_learn_host`` found it
        # in a cached table: the read and rewrite hot path (a request inside one cluster, in
        # ``submit_read`` and ``submit_write``) looks here first, without a lock. An allocated entry never
        # changes while the image is open except by repair and compaction (``check``), which
        # clear this map with the cache; eviction, discard and write_zeroes keep the mapping.
        # Bounded by clearing it when full.
        self._hosts = {}
        self._hosts_max = HOSTS_MAX
        self._cbits, self._cmask, self._csize = geo.cluster_bits, geo.cluster_mask, geo.cluster_size
        self.events = None  # callable(name) for named fault points (tests)
        self.tio = tables.TableIO(f, geo.table_bytes, self.meta_align, self._event)
        self.pending = {}  # guest cluster index -> Future of the allocation that owns it
        self.creating = {}  # l1 index -> Entry of an L2 table being created
        self.allocs_in_flight = 0
        # Write-back (``_ConcurrentAlloc``): acknowledged allocations whose table write is still
        # in flight, each with the future of that write; a flush waits for them first.
        self._unwritten = {}
        self._meta_error = None  # the first failed table write of an acknowledged allocation
        self._nc_fut = None  # Future while the need-check bit is being set or cleared
        self._extend_lock = threading.Lock()
        self._header_lock = threading.Lock()  # serialises header writes (held across that I/O)
        self._meta_free = {}  # length -> aligned buffers for table writes (list ops are atomic)
        self._flush_lock = threading.Lock()  # ordered flushes (data -> flush -> L2, backing)
        self._flush_waiters = []
        self._flush_running = False
        self._file_length = length
        self._preallocate = True  # the growth reserve gets disk blocks (see _extend)
        self._inflight = 0  # tracked requests (see _track), under self.lock
        self._inflight_cond = threading.Condition(self.lock)
        self.l1 = self.tio.read(h.l1_table_offset)
        self.l1_entry = Entry(h.l1_table_offset, CLEAN)
        self.l1_entry.table = self.l1
        if self.backing_filename is not None:
            self._open_backing()
        if not self.read_only:
            if h.autoclear_features & ~fmt.AUTOCLEAR_FEATURE_MASK:
                self._write_header(autoclear_features=h.autoclear_features
                                   & fmt.AUTOCLEAR_FEATURE_MASK)
                f.flush()
            if length > self.file_size:
                # A partial trailing cluster: nothing references it and new clusters overwrite
                # it, so drop it now; the space past the end of file then reads as zeros.
                f.truncate(self.file_size)
                self._file_length = self.file_size
        timeout = dopts.get("need_check_timeout", DEFAULT_NEED_CHECK_TIMEOUT)
        self._timer = _IdleTimer(timeout, self._idle_clear) if timeout > 0 else None
        # Pool threads start on demand, often from a completion callback, and a thread inherits the
        # CPUs of the one that starts it: a thread-engine worker may be kept to one CPU just then.
        self.pool = ThreadPoolExecutor(
            max_workers=dopts.get("pool_size", DEFAULT_POOL_SIZE), thread_name_prefix="qed",
            initializer=float_thread,
        )
        if not self.read_only and self.header.need_check:
            self.check(repair=True)

    def _open_backing(self):
        """Open the backing file through the block layer (which resolves the name, detects loops
        and names both files when the host cannot open it); nothing when opened with no_backing."""
        bfmt = "raw" if self.header.features & fmt.F_BACKING_FORMAT_NO_PROBE else None
        self._backing = self.options.open_backing(self.path, self.backing_filename, bfmt)

    def _event(self, name):
        announce(name)  # labels this thread's next host writes for vblock.testing.faults
        if self.events is not None:
            self.events(name)

    @property
    def backing(self):
        return self._backing

    # -- header ------------------------------------------------------------------------------------
    def _write_header(self, **changes):
        """Rewrite the header with ``changes`` applied (the first aligned block, keeping the bytes
        after the 64-byte header as they are). ``features_set`` / ``features_clear`` name bits.
        Header writes are serialised by their own lock, so concurrent changes (a resize and the
        need-check bit, say) never undo each other."""
        set_bits = changes.pop("features_set", 0)
        clear_bits = changes.pop("features_clear", 0)
        with self._header_lock:
            h = self.header
            if set_bits or clear_bits:
                changes["features"] = (h.features | set_bits) & ~clear_bits
            h = h.with_(**changes)
            self._event("HEADER_UPDATE")
            buf = self.f.alloc(self.meta_align)
            if self._head_area is not None:
                buf[:] = self._head_area
            else:
                self.f.pread(buf, 0)
            h.pack_into(buf, 0)
            self.f.pwrite(buf, 0)
            if self._head_area is not None:
                self._head_area[:64] = buf[:64]
            self.header = h

    def _ensure_need_check(self):
        """Set the need-check bit and make it durable before the first allocation (no backing)."""
        while True:
            with self.lock:
                if self._nc_fut is None:
                    if self.header.need_check:
                        return
                    fut = self._nc_fut = Future()
                    mine = True
                else:
                    fut = self._nc_fut
                    mine = False
            if not mine:
                fut.result()
                continue
            try:
                self._write_header(features_set=fmt.F_NEED_CHECK)
                self.f.flush()
            except BaseException as exc:
                with self.lock:
                    self._nc_fut = None
                fut.set_exception(exc)
                raise
            with self.lock:
                self._nc_fut = None
            fut.set_result(None)
            return

    def _idle_clear(self):
        """Clear the need-check bit when no allocation is in flight (the idle timer's action)."""
        with self.lock:
            if (self.allocs_in_flight or self._nc_fut is not None or not self.header.need_check
                    or self.damaged):
                return
            fut = self._nc_fut = Future()
        err = None
        try:
            self._trim()
            self.f.flush()
            self._write_header(features_clear=fmt.F_NEED_CHECK)
            self.f.flush()
        except BaseException as exc:
            err = exc
        with self.lock:
            self._nc_fut = None
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)
        self._event("NEED_CHECK_CLEARED")

    # -- request tracking ----------------------------------------------------------------------------
    def _track(self, fut):
        """Count ``fut`` as in flight until it completes. Tracked: everything that may change
        metadata (allocations, slow-path work), which ``check`` and ``close`` wait for. Data I/O
        on the fast path is not: as with raw images, callers finish their requests before close
        (the host file still waits for them)."""
        with self._inflight_cond:
            self._inflight += 1
        fut.add_done_callback(self._untrack)
        return fut

    def _untrack(self, fut):
        with self._inflight_cond:
            self._inflight -= 1
            if not self._inflight:
                self._inflight_cond.notify_all()

    def _on_pool(self, fn, *args):
        """Run ``fn(*args)`` on the pool; its return value (a value or a Future) completes the
        returned future."""
        out = Future()
        self.pool.submit(resolve, out, fn, *args)
        return out

    # -- table access ------------------------------------------------------------------------------
    def _bad_table(self, l1_index, offset):
        return ImageError(self.path, "l1_table",
                          f"L1 entry {l1_index} holds an invalid L2 table offset {offset:#x}")

    def _hold_table(self, l1_index):
        """The L2 entry for ``l1_index``, held (load it if needed), or None on an L1 miss."""
        with self.lock:
            l2off = self.l1[l1_index]
            if l2off == 0:
                entry = self.creating.get(l1_index)
                if entry is not None:
                    self.cache.hold(entry)
                return entry
            if not self.geo.table_offset_valid(l2off, self.file_size):
                raise self._bad_table(l1_index, l2off)
            entry, must_load = self.cache.acquire(l2off)
        if must_load:
            try:
                table = self.tio.read(l2off)
            except BaseException as exc:
                with self.lock:
                    fut = self.cache.load_failed(entry)
                    self.cache.release(entry)
                fut.set_exception(exc)
                raise
            with self.lock:
                fut = self.cache.loaded(entry, table)
            fut.set_result(table)
        else:
            try:
                wait_loaded(entry)
            except BaseException:
                with self.lock:
                    self.cache.release(entry)
                raise
        return entry

    def _release(self, entry):
        if entry is not None:
            with self.lock:
                self.cache.release(entry)

    def _table_or_none(self, l1_index):
        """For read-only walks (block_status): the table array or None; loads as needed."""
        entry = self._hold_table(l1_index)
        if entry is None:
            return None
        table = entry.table
        self._release(entry)
        return table

    def _peek(self, l1_index):
        """Fast path: (True, table or None) if known without I/O, else (False, None)."""
        l2off = self.l1[l1_index]
        if l2off == 0:
            return True, None
        table = self.cache.peek(l2off)
        return table is not None, table

    def _invalid(self, pos, host):
        """QEMU answers EINVAL; we name the structure at fault (the request still fails)."""
        return ImageError(self.path, "l2_table",
                          f"invalid cluster offset {host:#x} for guest offset {pos}")

    # -- read --------------------------------------------------------------------------------------
    def _learn_host(self, index):
        """The host offset of guest cluster ``index`` if it is allocated and its table is cached
        (then ``_hosts`` remembers it), else None: the general path decides. No lock, no I/O."""
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
        hosts = self._hosts
        if len(hosts) >= self._hosts_max:
            hosts.clear()
        hosts[index] = host
        return host

    def submit_read(self, offset, buffers):
        length = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        inside = offset & self._cmask
        if inside + length <= self._csize:  # inside one cluster: the hot path
            host = self._hosts.get(offset >> self._cbits) or self._learn_host(offset >> self._cbits)
            if host is not None:
                return self.f.submit_read(host + inside, buffers)
        geo = self.geo
        runs = []
        pos, end = offset, offset + length
        while pos < end:
            known, table = self._peek(pos >> geo.l1_shift)
            if not known:
                return self._track(self._on_pool(self._read_slow, offset, buffers, length))
            run = lookup.find_run(geo, table, pos, end - pos, self.file_size)
            runs.append(run)
            pos += run[1]
        return self._read_runs(offset, buffers, runs, length)

    def _read_slow(self, offset, buffers, length):
        geo = self.geo
        runs = []
        for pos, kind, n, host in lookup.runs(geo, self._table_or_none, offset, length,
                                              self.file_size):
            runs.append((kind, n, host))
        return self._read_runs(offset, buffers, runs, length)

    def _read_runs(self, offset, buffers, runs, length):
        if len(runs) == 1:
            kind, n, host = runs[0]
            if kind is lookup.FOUND:
                return self.f.submit_read(host, buffers)
        pos = offset
        for kind, n, host in runs:  # fail before any I/O touches the caller's buffers
            if kind is lookup.INVALID:
                return failed(self._invalid(pos, host))
            pos += n
        futs = []
        skip = 0
        pos = offset
        for kind, n, host in runs:
            views = buffers if len(runs) == 1 else _slice(buffers, skip, n)
            if kind is lookup.FOUND:
                futs.append(self.f.submit_read(host, views))
            elif kind is lookup.UNALLOCATED and self._backing is not None:
                fut = self._read_backing(pos, views, n)
                if fut is not None:
                    futs.append(fut)
            else:
                _zero_fill(views)
            skip += n
            pos += n
        return join(futs, length)

    def _read_backing(self, pos, views, n):
        """Read [pos, pos+n) from the backing image into ``views``; zeros past its end."""
        inside = max(0, min(n, self._backing.size - pos))
        if inside < n:
            _zero_fill(_slice(views, inside, n - inside))
        if inside == 0:
            return None
        return self._backing.submit_read(pos, _slice(views, 0, inside) if inside < n else views)

    # -- write -------------------------------------------------------------------------------------
    def submit_write(self, offset, buffers, fua=False):
        length = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        inside = offset & self._cmask
        if inside + length <= self._csize:  # inside one cluster: the hot path
            host = self._hosts.get(offset >> self._cbits) or self._learn_host(offset >> self._cbits)
            if host is not None:
                fut = self.f.submit_write(host + inside, buffers)
                return followed_by(fut, self.submit_flush, length) if fua else fut
        geo = self.geo
        known, table = self._peek(offset >> geo.l1_shift)
        if known and table is not None:
            kind, n, host = lookup.find_run(geo, table, offset, length, self.file_size)
            if kind is lookup.FOUND and n == length:  # several contiguous clusters
                fut = self.f.submit_write(host, buffers)
                return followed_by(fut, self.submit_flush, length) if fua else fut
        fut = self._alloc_inline(offset, buffers, length) if known else None  # tracks itself
        if fut is None:
            fut = self._track(self._on_pool(self._write_slow, offset, buffers, length, False))
        if fua:
            fut = self._track(followed_by(fut, self.submit_flush, length))
        return fut

    def _write_slow(self, offset, buffers, length, zero):
        """Pool thread: write (or, with ``zero``, zero; then ``buffers`` is None and the range is
        cluster-aligned) [offset, offset+length), allocating as needed."""
        geo = self.geo
        futs = []
        pos, end = offset, offset + length
        try:
            while pos < end:
                l1_index = pos >> geo.l1_shift
                entry = self._hold_table(l1_index)
                try:
                    table = entry.table if entry is not None else None
                    kind, n, host = lookup.find_run(geo, table, pos, end - pos, self.file_size)
                    if kind is lookup.INVALID:
                        raise self._invalid(pos, host)
                    if kind is lookup.FOUND:
                        if zero:
                            futs.append(self.f.submit_zero_range(host, n))
                        else:
                            futs.append(self.f.submit_write(host, _slice(buffers, pos - offset, n)))
                        pos += n
                        continue
                    if zero and kind is lookup.ZERO:
                        pos += n
                        continue
                    views = None if zero else _slice(buffers, pos - offset, n)
                    done = self._allocate(l1_index, entry, pos, n, views, kind)
                finally:
                    self._release(entry)
                if done:
                    pos += n
        finally:
            _wait_all(futs)
        return length

    def _allocate(self, l1_index, entry, pos, n, views, kind):
        """Allocate and write one run (see alloc.py). Returns False when the tables changed under
        us and the caller must look again."""
        geo = self.geo
        zero = views is None
        with self.lock:
            # The table may have changed since the lookup: recheck under the lock.
            if self.l1[l1_index] == 0:
                current = self.creating.get(l1_index)
            else:
                current = self.cache.get(self.l1[l1_index])
            if current is not entry:
                return False
            table = entry.table if entry is not None else None
            k2, n2, _ = lookup.find_run(geo, table, pos, n, self.file_size)
            if k2 is not kind or n2 != n:
                return False
            busy, claim = self._claim(l1_index, entry, pos, n, zero)
        if busy is not None:
            busy.exception()  # wait; its outcome is the other request's business
            return False
        p, entry, done = claim
        ok = False
        try:
            # Set with or without a backing file (QEMU sets it only without one): a crash can
            # leak clusters either way, and only a repair at the next open gives them back.
            self._ensure_need_check()
            if not zero:
                self._write_data(p, views, kind)
            self._update(entry, p.entries(geo), "L2_UPDATE").result()
            ok = True
        finally:
            self._alloc_end(p, entry, done, ok)
        return True

    def _claim(self, l1_index, entry, pos, n, zero):
        """Under ``self.lock``: claim the clusters of [pos, pos+n) for one allocation. Returns
        (the future of an allocation already holding one of them, None), or (None, (plan, the
        held table entry, the future that completes when this allocation ends)); a new L2 table
        is created when ``entry`` is None (L1 miss)."""
        geo = self.geo
        pending = self.pending
        for c in range(pos >> geo.cluster_bits, ((pos + n - 1) >> geo.cluster_bits) + 1):
            busy = pending.get(c)
            if busy is not None:
                return busy, None
        p = alloc.plan(geo, self.file_size, pos, n, zero, entry is None)
        self.file_size = p.file_size
        if entry is None:
            entry = self.cache.create(p.l2_offset, tables.new_table(geo.table_entries), l1_index)
            self.creating[l1_index] = entry
        else:
            self.cache.hold(entry)
        done = Future()
        for c in p.guest_clusters(geo):
            pending[c] = done
        self.allocs_in_flight += 1
        return None, (p, entry, done)

    def _alloc_end(self, p, entry, done, ok, counted=False):
        """An allocation is over (written or failed): drop its pending marks and its hold. A
        failed one may have left clusters allocated but unlinked: the need-check bit then stays
        set until the image is repaired (at the next read-write open). ``counted``: the
        allocation is one of the tracked requests itself (inline allocations are)."""
        with self.lock:
            idle = self._alloc_ended(p, entry, done, ok, counted)
        done.set_result(None)
        if idle:
            self._timer.arm()

    def _unpend(self, p, done):
        """Under ``self.lock``: drop the pending marks that ``done`` holds on the clusters of
        ``p`` (the caller completes ``done`` outside the lock, so that waiters look again)."""
        pending = self.pending
        for c in p.guest_clusters(self.geo):
            if pending.get(c) is done:
                del pending[c]

    def _alloc_ended(self, p, entry, done, ok, counted):
        """Under ``self.lock``: the bookkeeping of ``_alloc_end`` (pending marks of ``done``, none
        when it is None); returns whether the idle timer must be armed (after ``done`` is
        completed, outside the lock)."""
        if done is not None:
            self._unpend(p, done)
        self.allocs_in_flight -= 1
        self.cache.release(entry)
        if not ok:
            self.damaged = True
        if counted:
            self._inflight -= 1
            if not self._inflight:
                self._inflight_cond.notify_all()
        return self.allocs_in_flight == 0 and self._timer is not None and not self.damaged

    def _alloc_inline(self, offset, buffers, length):
        """The allocating write without a thread hop: when the table is cached (or the L1 entry is
        0), need-check is already set and no cluster of the run is being allocated, plan under the
        lock and let I/O completions carry the rest (backing-file reads for the head and tail,
        data, a shared flush when there is a backing file, then the table update; see alloc.py).
        Returns None when the request needs the pool."""
        geo = self.geo
        l1_index = offset >> geo.l1_shift
        with self.lock:
            if self._nc_fut is not None or not self.header.need_check:
                return None
            l2off = self.l1[l1_index]
            if l2off:
                entry = self.cache.get(l2off)
                if entry is None or entry.state is LOADING:
                    return None
                table = entry.table
            else:
                entry = self.creating.get(l1_index)
                table = entry.table if entry is not None else None
            kind, n, _ = lookup.find_run(geo, table, offset, length, self.file_size)
            if n != length or (kind is not lookup.UNALLOCATED and kind is not lookup.ZERO):
                return None
            busy, claim = self._claim(l1_index, entry, offset, length, False)
            if busy is not None:
                return None  # another request is allocating there: wait on the pool
            self._inflight += 1  # tracked as a request until _alloc_end (close waits for it)
        p, entry, done = claim
        out = Future()

        if self._backing is None:
            return _ConcurrentAlloc(self, p, entry, done, out, length).start(buffers)

        def finish(exc):
            self._alloc_end(p, entry, done, exc is None, counted=True)
            if exc is None:
                out.set_result(length)
            else:
                out.set_exception(exc)

        entries = p.entries(geo)

        def ordered(exc):
            if exc is None:
                self._update(entry, entries, "L2_UPDATE", finish)
            else:
                finish(exc)

        def written(f):
            exc = f.exception()
            if exc is None and self._backing is not None and not self._unsafe:
                self._ordered_flush(ordered)
            else:
                ordered(exc)

        def filled(f):
            exc = f.exception()
            if exc is not None:
                finish(exc)
                return
            try:
                self._event("DATA_WRITE")
                fut = self.f.submit_write(start, iov)
            except BaseException as e:
                finish(e)
                return
            fut.add_done_callback(written)

        try:
            self._extend(p.host_offset + p.nclusters * geo.cluster_size)
            start, iov, fills = self._layout(p, buffers, kind)
            reads = [r for r in (self._read_backing(pos, [buf], len(buf)) for pos, buf in fills)
                     if r is not None]
        except BaseException as exc:
            finish(exc)
            return out
        join(reads, 0).add_done_callback(filled)
        return out

    def _extend(self, end):
        """Grow the file to at least ``end`` bytes; never shrinks it.

        The file grows ahead of the allocation pointer, in steps of half its size (16 MiB to
        1 GiB): file systems serialise writes that extend a file, and writes inside it run in
        parallel; and each step takes the file's lock (steps of an eighth from 1 MiB took 44
        truncates and 17 ms of a 1 GiB conversion). Each step is allocated (``HostFile.allocate``),
        not left a hole: a write into a hole makes the file system allocate on the write's path,
        which an O_DIRECT write cannot do without blocking, so io_uring passes it to a worker
        thread (allocating 8 KiB writes at 16 in flight: 25k -> 34-48k IOPS; a 1 GiB conversion
        through the page cache: 0.23-0.26 -> 0.19-0.21 s). Where the file system cannot allocate,
        or the space is not there, the step is a truncate (a hole) instead.

        The extra tail is unreferenced: a clean close and the idle need-check clear cut it off
        (and return its space), and after a crash the need-check repair at the next open reclaims
        it as trailing leaks."""
        if end <= self._file_length:
            return
        with self._extend_lock:
            if end > self._file_length:
                step = min(max(self._file_length // 2, 16 << 20), 1 << 30)
                end = max(end, -(-(self._file_length + step) // self.geo.cluster_size)
                          * self.geo.cluster_size)
                allocated = False
                if self._preallocate:
                    try:
                        self.f.allocate(self._file_length, end - self._file_length)
                        allocated = True
                    except OSError as exc:  # ENOSPC and the rest: a hole, the writes will tell
                        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                            self._preallocate = False  # not on this file system: stop asking
                if not allocated:
                    self.f.truncate(end)
                self._file_length = end

    def _trim(self):
        """Cut the file back to the allocation pointer (drop the growth reserve)."""
        with self._extend_lock:
            if self._file_length > self.file_size:
                self.f.truncate(self.file_size)
                self._file_length = self.file_size

    def _layout(self, p, views, kind):
        """Where the data write of plan ``p`` starts and its buffers: the guest's ``views``, plus
        head and tail buffers to fill from the backing file when the clusters were unallocated
        over one (listed as (guest offset, buffer) in the third element). Zero padding is never
        written: new clusters lie past the old end of file and read as zeros already."""
        iov = list(views)
        start = p.host_offset + (p.pos - p.cluster_start)
        fills = []
        if kind is lookup.UNALLOCATED and self._backing is not None:
            backing_end = self._backing.size
            head_pos, head_len = p.head
            tail_pos, tail_len = p.tail(self.geo)
            if head_len and head_pos < backing_end:
                buf = self.f.alloc(head_len)
                iov.insert(0, buf)
                fills.append((head_pos, buf))
                start = p.host_offset
            if tail_len and tail_pos < backing_end:
                tail_len = min(tail_len, -(-(backing_end - tail_pos) // self.align) * self.align)
                buf = self.f.alloc(tail_len)
                iov.append(buf)
                fills.append((tail_pos, buf))
        return start, iov, fills

    def _write_data(self, p, views, kind):
        self._extend(p.host_offset + p.nclusters * self.geo.cluster_size)
        start, iov, fills = self._layout(p, views, kind)
        for pos, buf in fills:
            self._copy_backing(pos, buf)
        self._event("DATA_WRITE")
        self.f.submit_write(start, iov).result()
        if self._backing is not None and not self._unsafe:
            fut = Future()
            self._ordered_flush(_completer(fut))
            fut.result()

    def _ordered_flush(self, callback):
        """Run ``callback(error or None)`` after a flush that started after this call (data ->
        flush -> L2 with a backing file). Concurrent callers share flushes: while one is in
        flight, the next round collects everyone who arrives meanwhile."""
        with self._flush_lock:
            self._flush_waiters.append(callback)
            if self._flush_running:
                return
            self._flush_running = True
        self._flush_round()

    def _flush_round(self):
        with self._flush_lock:
            waiters, self._flush_waiters = self._flush_waiters, []
            if not waiters:
                self._flush_running = False
                return

        def done(f):
            err = f.exception()
            for w in waiters:
                w(err)
            self._flush_round()

        self._event("DATA_FLUSH")
        try:
            fut = self.f.submit_flush()
        except BaseException as exc:
            fut = failed(exc)
        fut.add_done_callback(done)

    def _copy_backing(self, pos, buf):
        fut = self._read_backing(pos, [buf], len(buf))
        if fut is not None:
            fut.result()

    def _update(self, entry, updates, event, callback=None, hidden=False):
        """Queue ``updates`` (index -> value) for ``entry``'s table. Once they are written and
        visible, ``callback(error or None)`` runs (on an I/O completion); without a callback a
        future is returned instead. The first request to find the table idle starts its writer;
        the writer runs on I/O completions, one batch after another, until the queue is empty (no
        thread waits for it). With ``hidden`` the updates are written but stay invisible to
        lookups until their allocation ends (``_ConcurrentAlloc``: the data write is still running)."""
        fut = None
        if callback is None:
            fut = Future()
            callback = _completer(fut)
        with self.lock:
            if hidden:
                entry.hidden.update(updates)
            entry.queued.update(updates)
            entry.waiters.append(callback)
            start = entry.state is not WRITING
            if start:
                self.cache.move(entry, "queue")
                self.cache.move(entry, "write_start")
                batch, waiters = entry.queued, entry.waiters
                entry.queued, entry.waiters = {}, []
        if start:
            self._write_batch(entry, batch, waiters, event)
        return fut

    def _write_batch(self, entry, batch, waiters, event):
        """Write one batch of ``entry``'s queued updates; ``_batch_done`` follows on completion."""

        buf = None

        def done(f):
            self._meta_release(buf)
            self._batch_done(entry, batch, waiters, event, f.exception())

        try:
            # Every write of the table carries the hidden updates that fall inside it.
            overlay = {**entry.hidden, **batch} if entry.hidden else batch
            if entry.new:
                table = entry.table[:]
                for i, v in overlay.items():
                    table[i] = v
                data = tables.encode(table)
                buf = self._meta_buffer(data)
                self._event("L2_ALLOC")
                fut = self.f.submit_write(entry.offset, [buf])
                fut = then(fut, self._after_new_table, entry)
            else:
                off, data = tables.encode_slice(entry.table, min(batch), max(batch) + 1,
                                                self.meta_align, overlay)
                buf = self._meta_buffer(data)
                self._event(event)
                fut = self.f.submit_write(entry.offset + off, [buf])
            # The batch's requests wait for this write: it goes to the kernel now, not after the
            # other callbacks of the completion batch that started it.
            self.f.push()
        except BaseException as exc:
            self._meta_release(buf)
            self._batch_done(entry, batch, waiters, event, exc)
            return
        fut.add_done_callback(done)

    def _after_new_table(self, entry):
        """A new table is written: flush it, then point its L1 entry at it."""
        if self._unsafe:
            return self._update(self.l1_entry, {entry.l1_index: entry.offset}, "L1_UPDATE")
        self._event("L2_FLUSH")
        return then(self.f.submit_flush(), self._update, self.l1_entry,
                      {entry.l1_index: entry.offset}, "L1_UPDATE")

    def _meta_buffer(self, data):
        """An aligned buffer holding ``data``, from a free list (allocating aligned memory costs
        more than the rest of a table update); give it back with ``_meta_release``."""
        free = self._meta_free.get(len(data))
        try:
            buf = free.pop()
        except (AttributeError, IndexError):
            buf = self.f.alloc(len(data))
        buf[:] = data
        return buf

    def _meta_release(self, buf):
        if buf is not None and len(buf) <= self.meta_align * 4:
            free = self._meta_free.setdefault(len(buf), [])
            if len(free) < 8:
                free.append(buf)

    def _batch_done(self, entry, batch, waiters, event, err):
        with self.lock:
            if err is None:
                table = entry.table
                hidden = entry.hidden
                for i, v in batch.items():
                    if i not in hidden:
                        table[i] = v
                if entry.new:
                    entry.new = False
                    if self.creating.get(entry.l1_index) is entry:
                        del self.creating[entry.l1_index]
            nbatch, nwaiters = entry.queued, entry.waiters
            entry.queued, entry.waiters = {}, []
            if nwaiters:
                self.cache.move(entry, "written_more")
                self.cache.move(entry, "write_start")
            else:
                self.cache.move(entry, "written")
        # The next batch goes out first: the callbacks of this one's requests would otherwise
        # delay it by their whole run (completing them and starting the next requests).
        if nwaiters:
            self._write_batch(entry, nbatch, nwaiters, event)
        for w in waiters:
            w(err)

    # -- flush, zeroes, discard ------------------------------------------------------------------
    def submit_flush(self):
        """Flush the host file, after the table writes of every allocation acknowledged so far
        (write-back: see ``_ConcurrentAlloc``). Once a table write of an acknowledged allocation
        has failed, every flush fails with its error until the image is reopened (``close``
        raises it too): that allocation's mapping is not in the file, so nothing since can be
        promised durable; the image stays marked for repair. With cache="unsafe" the host file is
        not flushed, but the table writes are still waited for and their failure reported."""
        with self.lock:
            written = list(self._unwritten.values())
        if not written:
            return self._flush_checked()
        # Tracked, so that close() waits for the host flush this starts later.
        return self._track(then(join(written, None), self._flush_checked))

    def _flush_checked(self):
        err = self._meta_error
        if err is not None:
            return failed(err)
        if self._unsafe:
            return completed(None)
        return self.f.submit_flush()

    def start_writeback(self):
        self.f.start_writeback()

    def submit_write_zeroes(self, offset, length, may_unmap):
        cs = self.geo.cluster_size
        a = -(-offset // cs) * cs
        b = (offset + length) // cs * cs
        if a >= b:
            return None  # no whole cluster: the block layer writes zeros as data
        if a != offset or b != offset + length:
            return self._track(self._on_pool(self._zeroes_split, offset, length, a, b))
        return self._track(self._on_pool(self._write_slow, a, None, b - a, True))

    def _zeroes_split(self, offset, length, a, b):
        for lo, hi in ((offset, a), (b, offset + length)):
            if hi > lo:
                self._write_slow(lo, [self.f.alloc(hi - lo)], hi - lo, False)
        self._write_slow(a, None, b - a, True)
        return None

    def submit_discard(self, offset, length):
        """Punch holes for whole discarded clusters that are allocated; keep the mapping."""
        return self._track(self._on_pool(self._discard, offset, length))

    def _discard(self, offset, length):
        cs = self.geo.cluster_size
        a = -(-offset // cs) * cs
        b = (offset + length) // cs * cs
        if a >= b:
            return None
        futs = []
        for pos, kind, n, host in lookup.runs(self.geo, self._table_or_none, a, b - a,
                                              self.file_size):
            if kind is lookup.FOUND:
                futs.append(self.f.submit_discard(host, n))
        try:
            _wait_all(futs)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
        return None

    # -- metadata --------------------------------------------------------------------------------
    def block_status(self, offset, length):
        out = []
        kinds = {lookup.FOUND: DATA, lookup.ZERO: ZERO, lookup.UNALLOCATED: UNALLOCATED}
        for pos, kind, n, host in lookup.runs(self.geo, self._table_or_none, offset, length,
                                              self.file_size):
            if kind is lookup.INVALID:
                raise self._invalid(pos, host)
            k = kinds[kind]
            last = out[-1] if out else None
            if (last is not None and last.kind == k and last.offset + last.length == pos
                    and (k != DATA or last.host_offset + last.length == host)):
                out[-1] = last._replace(length=last.length + n)  # runs split by L2 boundaries
            else:
                out.append(Run(pos, n, k, host if k == DATA else None))
        return out

    def truncate(self, size):
        if size < self.size:
            raise UnsupportedError(f"{self.path}: shrinking QED images is not supported")
        h = self.header
        if not fmt.image_size_valid(size, h.cluster_size, h.table_size):
            raise ValueError(f"{self.path}: invalid QED image size {size}")
        self._write_header(image_size=size)
        if not self._unsafe:
            self.f.flush()
        self.size = size

    def info(self):
        h = self.header
        d = {
            "cluster-size": h.cluster_size,
            "table-size": h.table_size,
            "dirty-flag": h.need_check,
            "actual-size": os.stat(self.path).st_blocks * 512,
        }
        if self.backing_filename is not None:
            d["backing-filename"] = self.backing_filename
            if h.features & fmt.F_BACKING_FORMAT_NO_PROBE:
                d["backing-filename-format"] = "raw"
            d["full-backing-filename"] = (self._backing.path if self._backing is not None
                                          else backing_path(self.path, self.backing_filename))
        return d

    def change_backing(self, name, fmt_name=None):
        """Point the image at another backing file (or none): header and name rewritten together,
        features recomputed (NO_PROBE only for raw), as ``qemu-img rebase -u`` does."""
        if self.header.compat_features & ~fmt.COMPAT_FEATURE_MASK:
            raise UnsupportedError(f"{self.path}: unknown compat features are set")
        raw = b""
        if name:
            raw = name.encode("utf-8", "surrogateescape")
            if fmt.HEADER_SIZE + len(raw) > self.geo.header_bytes or len(raw) >= 4096:
                raise OSError(errno.ENOSPC, f"{self.path}: backing file name too long")
        with self._header_lock:
            h = self.header
            features = h.features & ~(fmt.F_BACKING_FILE | fmt.F_BACKING_FORMAT_NO_PROBE)
            if name:
                features |= fmt.F_BACKING_FILE
                if fmt_name == "raw":
                    features |= fmt.F_BACKING_FORMAT_NO_PROBE
            new = h.with_(features=features, backing_filename_offset=fmt.HEADER_SIZE,
                          backing_filename_size=len(raw))
            size = -(-(fmt.HEADER_SIZE + len(raw)) // self.meta_align) * self.meta_align
            area = self.f.alloc(size)
            self.f.pread(area, 0)
            new.pack_into(area, 0)
            area[fmt.HEADER_SIZE : fmt.HEADER_SIZE + len(raw)] = raw
            self._event("HEADER_UPDATE")
            self.f.pwrite(area, 0)
            self.f.flush()
            if self._head_area is not None:
                n = min(len(self._head_area), len(area))
                self._head_area[:n] = area[:n]
            self.header = new
        old, self._backing = self._backing, None
        self.backing_filename = name or None
        if old is not None:
            old.close()
        if name:
            self._open_backing()

    # -- check -----------------------------------------------------------------------------------
    def check(self, repair=False):
        """qemu-img check's counters (see check.py). With ``repair``: zero invalid entries, reclaim
        leaked clusters (fill interior ones from the end of the file, truncate, punch holes for any
        left), clear need-check."""
        self._drain()
        geo = self.geo
        h = self.header
        s = checkmod.scan(geo, h.l1_table_offset, h.image_size, self.l1, self.tio.read,
                          self.file_size)
        corruptions_fixed = leaks_fixed = 0
        if repair and not self.read_only:
            if s.l1_fixes or s.l2_fixes:
                self._set_need_check_sync()
            for l2off, idxs in s.l2_fixes.items():
                table = self.tio.read(l2off)
                for i in idxs:
                    table[i] = 0
                self.tio.write_whole(l2off, table, "L2_REPAIR")
                corruptions_fixed += len(idxs)
            if s.l1_fixes:
                for i in s.l1_fixes:
                    self.l1[i] = 0
                self.tio.write_whole(h.l1_table_offset, self.l1, "L1_REPAIR")
                corruptions_fixed += len(s.l1_fixes)
            with self.lock:
                self.cache.clear()
                self._hosts.clear()
            found = s
            leaks_found = s.leaks
            if s.leaked and s.corruptions == s.fixable:
                # Fill interior leaks with the clusters at the end of the file (compact.py), so
                # that nothing but a truncation is left to do.
                self._set_need_check_sync()
                self._compact(s.leaked)
                s = checkmod.scan(geo, h.l1_table_offset, h.image_size, self.l1, self.tio.read,
                                  self.file_size)
                if s.leaked and s.corruptions == s.fixable:  # holes no whole table fits in
                    from . import reclaim

                    reclaim.repair(self)
                    h = self.header
                    s = checkmod.scan(geo, h.l1_table_offset, h.image_size, self.l1,
                                      self.tio.read, self.file_size)
            nclusters = self.file_size // geo.cluster_size
            trailing, interior = checkmod.leak_ranges(s.leaked, nclusters)
            for start, count in interior:
                try:
                    self.f.discard(start * geo.cluster_size, count * geo.cluster_size)
                except OSError as exc:
                    if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                        raise
            if trailing is not None:
                self.f.flush()
                self.file_size = trailing * geo.cluster_size
                with self._extend_lock:
                    self.f.truncate(self.file_size)
                    self._file_length = self.file_size
            self.f.flush()
            leaks_fixed = leaks_found - sum(n for _, n in interior)  # punched ones stay leaks
            if corruptions_fixed or leaks_fixed:
                # double-check, as qemu-img does after a repair
                after = checkmod.scan(geo, h.l1_table_offset, h.image_size, self.l1,
                                      self.tio.read, self.file_size)
            else:
                after = s
            if after.corruptions == 0 and after.check_errors == 0:
                self.damaged = False
                if self.header.need_check:
                    self._write_header(features_clear=fmt.F_NEED_CHECK)
                    self.f.flush()
            result = after.as_dict(self.path, corruptions_fixed, leaks_fixed)
            result["corruptions-found"] = found.corruptions
            result["leaks-found"] = found.leaks
            return result
        return s.as_dict(self.path)

    def _compact(self, leaked):
        """Move clusters from the end of the file into the leaked ones (see compact.py)."""
        geo = self.geo
        cs = geo.cluster_size
        lowest = leaked[0]
        owners = {}
        for l1i, l2off in enumerate(self.l1):
            if not l2off:
                continue
            first = l2off // cs
            if first + geo.table_size > lowest:
                for k in range(geo.table_size):
                    owners[first + k] = ("table", l1i, first)
            for l2i, entry in enumerate(self.tio.read(l2off)):
                if entry > fmt.ZERO_CLUSTER and entry // cs >= lowest:
                    owners[entry // cs] = ("data", l2off, l2i)
        moves = compact.plan(leaked, self.file_size // cs, geo.table_size, owners.get)
        if not moves.data and not moves.tables:
            return
        f = self.f
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
                table = self.tio.read(l2off)
                for l2i, new in items:
                    table[l2i] = new
                self.tio.write_whole(l2off, table, "L2_REPAIR")
            f.flush()
        if moves.tables:
            buf = f.alloc(geo.table_bytes)
            for src, dst, _ in moves.tables:
                f.pread(buf, src * cs)
                f.pwrite(buf, dst * cs)
            f.flush()
            for _, dst, l1i in moves.tables:
                self.l1[l1i] = dst * cs
            self.tio.write_whole(self.header.l1_table_offset, self.l1, "L1_REPAIR")
            f.flush()
        with self.lock:
            self.cache.clear()
            self._hosts.clear()

    def _set_need_check_sync(self):
        if not self.header.need_check:
            self._write_header(features_set=fmt.F_NEED_CHECK)
            self.f.flush()

    def _drain(self):
        with self._inflight_cond:
            while self._inflight:
                self._inflight_cond.wait()

    # -- close -----------------------------------------------------------------------------------
    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            self._drain()
            if self._timer is not None:
                self._timer.stop()
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            if not self.read_only:
                self._trim()
                if not self._unsafe:  # cache="unsafe": flushes do nothing, close included
                    self.f.flush()
                if self.header.need_check and not self.damaged:
                    self._write_header(features_clear=fmt.F_NEED_CHECK)
                    if not self._unsafe:
                        self.f.flush()
        finally:
            self._teardown()
        if self._meta_error is not None:
            # An acknowledged write's table update failed (see submit_flush): say so here too,
            # for callers that close without flushing (cache="unsafe" conversions do).
            raise self._meta_error

    def _teardown(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        self.f.close()


class _ConcurrentAlloc:
    """One inline allocating write without a backing file: the data write and the table update
    go out together, and the request is acknowledged as soon as its data is written (write-back
    metadata, as a disk with a volatile cache, or qcow2's L2 cache, acknowledges before its
    metadata is durable; a flush waits for the table write, see ``submit_flush``).

    Crash safety is unchanged, since no flush separated the two anyway (only a backing file's COW
    needs one): either may reach the disk first, and a table entry whose data did not arrive
    points past the old end of file, into space that reads as zeros, which is the cluster's old
    content. What changes is visibility: lookups must not find the new clusters before their data
    is written, so the updates stay hidden (written with every write of the table, invisible to
    lookups) until the data write is over. Then they are shown, the clusters are no longer
    pending, and the request completes, while the table write may still be in flight (except in
    a new table, which lookups find only once its L1 entry is written: there the request waits
    for the table write, L1 included, as before). Until the table write ends, the allocation
    stays counted (``allocs_in_flight``, ``_inflight``: close, check and the need-check clear
    wait for it) and listed in ``drv._unwritten`` (flushes wait for it).

    Failures: a failed data write fails the request, and the entries are shown only if the table
    write succeeded (the file's table then points there). A table write that fails before the
    data is written fails the request and forgets the entries. One that fails after the request
    was acknowledged leaves the entries shown in the cache but not in the file: the image stays
    marked for repair and every later flush fails with that error (``drv._meta_error``).

    The completions meet under the driver's lock."""

    __slots__ = ("drv", "p", "entry", "entries", "done", "out", "length", "left", "data_error",
                 "table_error", "written")

    def __init__(self, drv, p, entry, done, out, length):
        self.drv = drv
        self.p = p
        self.entry = entry
        self.entries = p.entries(drv.geo)
        self.done = done  # the allocation's pending mark
        self.out = out  # the request's future
        self.length = length
        self.left = 2
        self.data_error = self.table_error = None
        self.written = None  # Future of the table write once the request was acknowledged

    def start(self, buffers):
        drv = self.drv
        p = self.p
        try:
            drv._extend(p.host_offset + p.nclusters * drv.geo.cluster_size)
            # _layout without a backing file: the guest's buffers where the request starts
            drv._event("DATA_WRITE")
            data = drv.f.submit_write(p.host_offset + (p.pos - p.cluster_start), buffers)
        except BaseException as exc:  # the data write never started, nor the table update
            self.data_error = exc
            self.left = 1
            self._part(None)
            return self.out
        drv._update(self.entry, self.entries, "L2_UPDATE", self._table_done, hidden=True)
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
        drv = self.drv
        written = None
        with drv.lock:
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
                drv._unpend(self.p, self.done)
                self.written = drv._unwritten[self] = Future()
                exc = None
                idle = False
            elif self.written is not None:
                # The table write of an acknowledged request is over.
                del drv._unwritten[self]
                written = self.written
                if err is not None and drv._meta_error is None:
                    drv._meta_error = err
                idle = drv._alloc_ended(self.p, self.entry, None, err is None, True)
            else:
                # The table in the file holds the entries unless its write failed: show them (a
                # failed data write leaves allocated clusters that read zeros or part of the data).
                self._show(self.table_error is None)
                exc = self.data_error or self.table_error
                idle = drv._alloc_ended(self.p, self.entry, self.done, exc is None, True)
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
            drv._timer.arm()


def _completer(fut):
    """A table-writer callback that completes ``fut``."""

    def complete(err):
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)

    return complete

"""The QED driver: the operation table of ``vblock.block.interface`` over one open image.

Like QEMU's ``bdrv_qed``, this module holds the operations (probe, create, open, read, write,
write_zeroes, discard, flush, block_status, truncate, info, change_backing, check, close) over
one state object (``state.QedState``); the machinery they share lives beside it, one idea per
module: the table writer (``writer.py``), allocation (``alloc.py``), need-check (``needcheck.py``),
file growth (``growth.py``), header updates (``header.py``), repair (``check.py``, ``compact.py``).

Paths through a request:

* **Fast path** (calling thread, no thread hop, no lock): a read, or a write whose clusters are
  all allocated, whose L2 tables are cached (``L2Cache.peek``). Lookup, then submit to the host
  file. Reads of zero or unallocated clusters fill zeros or read the backing image inline.
* **Inline allocation** (calling thread, one lock): an allocating write whose table is cached,
  on an image whose need-check bit is already set: planned under the lock, then carried by I/O
  completions (``alloc.Allocator.inline``).
* **Slow path** (``self.pool``): everything that must wait: loading an L2 table, setting the
  need-check bit, copying from the backing file, zero markers, discards.

Shared state changes under ``QedState.lock``, which is never held across I/O (``state.py`` lists
what each lock guards).
"""

from __future__ import annotations

import errno
import os
import stat
import warnings
from concurrent.futures import ThreadPoolExecutor

from vblock.block.backing import backing_path
from vblock.block.interface import DATA, UNALLOCATED, ZERO, BlockDriver, Limits, Run
from vblock.block.iov import slice_views, zero_fill
from vblock.errors import ImageError, QemuCompatibilityWarning, UnsupportedError
from vblock.future import Future, failed, followed_by, join, resolve
from vblock.hostio import open_host_file
from vblock.hostio.engine import float_thread

from . import check as checkmod
from . import format as fmt
from . import header, lookup
from .alloc import Allocator
from .cache import wait_loaded
from .growth import Growth
from .needcheck import NeedCheck
from .state import QedState
from .writer import TableWriter

DEFAULT_L2_CACHE_SIZE = 64  # tables
DEFAULT_NEED_CHECK_TIMEOUT = 5.0  # seconds without allocation before the dirty bit is cleared
DEFAULT_POOL_SIZE = 32  # threads


def _wait_all(futures):
    err = None
    for f in futures:
        exc = f.exception()
        if exc is not None and err is None:
            err = exc
    if err is not None:
        raise err


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
            raise UnsupportedError(
                f"{path}: a QED image cannot be made on a device: QED allocates clusters "
                "at the end of its file, which a device cannot grow (use raw)"
            )
        cs = options.get("cluster_size", fmt.DEFAULT_CLUSTER_SIZE)
        ts = options.get("table_size", fmt.DEFAULT_TABLE_SIZE)
        backing = options.get("backing_file") or None
        bfmt = options.get("backing_fmt")
        try:
            h, head = fmt.create_header(size, cs, ts, backing, bfmt)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        if ts == 1:
            warnings.warn(
                f"{path}: QEMU cannot open QED images with table_size 1",
                QemuCompatibilityWarning,
                stacklevel=2,
            )
        elif ts >= 8:
            warnings.warn(
                f"{path}: QEMU corrupts QED images with table_size >= 8 on large writes",
                QemuCompatibilityWarning,
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

    # -- open ------------------------------------------------------------------------------------
    def __init__(self, path, options):
        self.path = os.fspath(path)
        self.read_only = bool(options.read_only)
        self.options = options
        self._f = open_host_file(
            self.path,
            direct="try" if options.direct else False,
            engine=options.aio,
            read_only=self.read_only,
        )
        self.state = None
        self.pool = None
        self._closed = False
        try:
            self._open(options.driver_options)
        except BaseException:
            self._teardown()
            raise

    def _open(self, dopts):
        f = self._f
        length = f.size
        align = max(512, f.alignment)
        # Metadata writes (tables, header) cover whole file-system blocks: a direct write smaller
        # than a block makes ext4 and XFS wait for every direct I/O in flight on the file.
        meta_align = max(4096, align)
        head = f.alloc(4096)
        n = f.pread(head, 0) if length else 0
        h = fmt.validate(head[: min(n, 4096)], length, self.path)
        geo = fmt.Geometry.of(h)
        if h.features & fmt.F_BACKING_FILE:
            end = h.backing_filename_offset + h.backing_filename_size
            area = f.alloc(-(-end // align) * align)
            f.pread(area, 0)
            self.backing_filename = fmt.backing_name(h, area, self.path)
        else:
            self.backing_filename = None
        self.size = h.image_size
        self.limits = Limits(
            request_alignment=align,
            mem_alignment=max(1, f.mem_alignment),
            max_transfer=1 << 30,
            discard_alignment=h.cluster_size,
            write_zeroes_alignment=h.cluster_size,
        )
        st = self.state = QedState(
            self.path,
            f,
            h,
            geo,
            read_only=self.read_only,
            unsafe=self.options.cache == "unsafe",
            align=align,
            meta_align=meta_align,
            # The header block(s) rewritten when the header changes: the first `meta_align` bytes.
            head_area=bytearray(head[:meta_align]) if meta_align <= 4096 else None,
            file_size=geo.round_down_to_cluster(length),
            l2_cache_size=dopts.get("l2_cache_size", DEFAULT_L2_CACHE_SIZE),
        )
        # Fixed for the life of the image: the operations reach them without going through
        # ``state``, and the hot path (a request inside one cluster, in ``submit_read`` and
        # ``submit_write``) reads ``_hosts`` and calls ``_learn_host`` directly.
        self.geo, self.cache, self.l1 = geo, st.cache, st.l1
        self._hosts = st.hosts
        self._learn_host = st.learn_host
        self._cbits, self._cmask, self._csize = geo.cluster_bits, geo.cluster_mask, geo.cluster_size
        self.growth = Growth(st, length)
        self.writer = TableWriter(st)
        timeout = dopts.get("need_check_timeout", DEFAULT_NEED_CHECK_TIMEOUT)
        self.needcheck = NeedCheck(st, self.growth, timeout)
        self.allocator = Allocator(st, self.writer, self.growth, self.needcheck)
        if self.backing_filename is not None:
            self._open_backing()
        if not self.read_only:
            if h.autoclear_features & ~fmt.AUTOCLEAR_FEATURE_MASK:
                header.write(
                    st, autoclear_features=h.autoclear_features & fmt.AUTOCLEAR_FEATURE_MASK
                )
                f.flush()
            # A partial trailing cluster: nothing references it and new clusters overwrite it,
            # so drop it now; the space past the end of file then reads as zeros.
            self.growth.trim()
        # Pool threads start on demand, often from a completion callback, and a thread inherits the
        # CPUs of the one that starts it: a thread-engine worker may be kept to one CPU just then.
        self.pool = ThreadPoolExecutor(
            max_workers=dopts.get("pool_size", DEFAULT_POOL_SIZE),
            thread_name_prefix="qed",
            initializer=float_thread,
        )
        if not self.read_only and st.header.need_check:
            self.check(repair=True)

    def _open_backing(self):
        """Open the backing file through the block layer (which resolves the name, detects loops
        and names both files when the host cannot open it); nothing when opened with no_backing."""
        bfmt = "raw" if self.state.header.features & fmt.F_BACKING_FORMAT_NO_PROBE else None
        self.state.backing = self.options.open_backing(self.path, self.backing_filename, bfmt)

    @property
    def f(self):
        """The image's host file (``QedState.f``). Replacing it (tests do, to hold I/O)
        replaces it for every part of the driver."""
        return self._f

    @f.setter
    def f(self, f):
        self._f = self.state.f = f

    @property
    def events(self):
        """callable(name) told of every named fault point (``QedState.events``), or None."""
        return self.state.events

    @events.setter
    def events(self, fn):
        self.state.events = fn

    @property
    def backing(self):
        return self.state.backing if self.state is not None else None

    def _on_pool(self, fn, *args):
        """Run ``fn(*args)`` on the pool; its return value (a value or a Future) completes the
        returned future."""
        out = Future()
        self.pool.submit(resolve, out, fn, *args)
        return out

    # -- table access ------------------------------------------------------------------------------
    def _hold_table(self, l1_index):
        """The L2 entry for ``l1_index``, held (load it if needed), or None on an L1 miss."""
        st = self.state
        with st.lock:
            l2off = self.l1[l1_index]
            if l2off == 0:
                entry = st.creating.get(l1_index)
                if entry is not None:
                    self.cache.hold(entry)
                return entry
            if not self.geo.table_offset_valid(l2off, st.file_size):
                raise ImageError(
                    self.path,
                    "l1_table",
                    f"L1 entry {l1_index} holds an invalid L2 table offset {l2off:#x}",
                )
            entry, must_load = self.cache.acquire(l2off)
        if must_load:
            try:
                table = st.tio.read(l2off)
            except BaseException as exc:
                with st.lock:
                    fut = self.cache.load_failed(entry)
                    self.cache.release(entry)
                fut.set_exception(exc)
                raise
            with st.lock:
                fut = self.cache.loaded(entry, table)
            fut.set_result(table)
        else:
            try:
                wait_loaded(entry)
            except BaseException:
                with st.lock:
                    self.cache.release(entry)
                raise
        return entry

    def _release(self, entry):
        if entry is not None:
            with self.state.lock:
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

    # -- read --------------------------------------------------------------------------------------
    def submit_read(self, offset, buffers):
        length = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        inside = offset & self._cmask
        if inside + length <= self._csize:  # inside one cluster: the hot path
            host = self._hosts.get(offset >> self._cbits) or self._learn_host(offset >> self._cbits)
            if host is not None:
                return self._f.submit_read(host + inside, buffers)
        geo = self.geo
        file_size = self.state.file_size
        runs = []
        pos, end = offset, offset + length
        while pos < end:
            known, table = self._peek(pos >> geo.l1_shift)
            if not known:
                return self.state.track(self._on_pool(self._read_slow, offset, buffers, length))
            run = lookup.find_run(geo, table, pos, end - pos, file_size)
            runs.append(run)
            pos += run[1]
        return self._read_runs(offset, buffers, runs, length)

    def _read_slow(self, offset, buffers, length):
        runs = []
        for _pos, kind, n, host in lookup.runs(
            self.geo, self._table_or_none, offset, length, self.state.file_size
        ):
            runs.append((kind, n, host))
        return self._read_runs(offset, buffers, runs, length)

    def _read_runs(self, offset, buffers, runs, length):
        f = self._f
        if len(runs) == 1:
            kind, n, host = runs[0]
            if kind is lookup.FOUND:
                return f.submit_read(host, buffers)
        st = self.state
        pos = offset
        for kind, n, host in runs:  # fail before any I/O touches the caller's buffers
            if kind is lookup.INVALID:
                return failed(st.invalid(pos, host))
            pos += n
        futs = []
        skip = 0
        pos = offset
        for kind, n, host in runs:
            views = buffers if len(runs) == 1 else slice_views(buffers, skip, n)
            if kind is lookup.FOUND:
                futs.append(f.submit_read(host, views))
            elif kind is lookup.UNALLOCATED and st.backing is not None:
                fut = st.read_backing(pos, views, n)
                if fut is not None:
                    futs.append(fut)
            else:
                zero_fill(views)
            skip += n
            pos += n
        return join(futs, length)

    # -- write -------------------------------------------------------------------------------------
    def submit_write(self, offset, buffers, fua=False):
        length = len(buffers[0]) if len(buffers) == 1 else sum(len(b) for b in buffers)
        inside = offset & self._cmask
        if inside + length <= self._csize:  # inside one cluster: the hot path
            host = self._hosts.get(offset >> self._cbits) or self._learn_host(offset >> self._cbits)
            if host is not None:
                fut = self._f.submit_write(host + inside, buffers)
                return followed_by(fut, self.submit_flush, length) if fua else fut
        geo = self.geo
        known, table = self._peek(offset >> geo.l1_shift)
        if known and table is not None:
            kind, n, host = lookup.find_run(geo, table, offset, length, self.state.file_size)
            if kind is lookup.FOUND and n == length:  # several contiguous clusters
                fut = self._f.submit_write(host, buffers)
                return followed_by(fut, self.submit_flush, length) if fua else fut
        fut = self.allocator.inline(offset, buffers, length) if known else None  # tracks itself
        if fut is None:
            fut = self.state.track(self._on_pool(self._write_slow, offset, buffers, length, False))
        if fua:
            fut = self.state.track(followed_by(fut, self.submit_flush, length))
        return fut

    def _write_slow(self, offset, buffers, length, zero):
        """Pool thread: write (or, with ``zero``, zero; then ``buffers`` is None and the range is
        cluster-aligned) [offset, offset+length), allocating as needed."""
        geo = self.geo
        st = self.state
        futs = []
        pos, end = offset, offset + length
        try:
            while pos < end:
                l1_index = pos >> geo.l1_shift
                entry = self._hold_table(l1_index)
                try:
                    table = entry.table if entry is not None else None
                    kind, n, host = lookup.find_run(geo, table, pos, end - pos, st.file_size)
                    if kind is lookup.INVALID:
                        raise st.invalid(pos, host)
                    if kind is lookup.FOUND:
                        if zero:
                            futs.append(self._f.submit_zero_range(host, n))
                        else:
                            futs.append(
                                self._f.submit_write(host, slice_views(buffers, pos - offset, n))
                            )
                        pos += n
                        continue
                    if zero and kind is lookup.ZERO:
                        pos += n
                        continue
                    views = None if zero else slice_views(buffers, pos - offset, n)
                    done = self.allocator.allocate(l1_index, entry, pos, n, views, kind)
                finally:
                    self._release(entry)
                if done:
                    pos += n
        finally:
            _wait_all(futs)
        return length

    # -- flush, zeroes, discard ------------------------------------------------------------------
    def submit_flush(self):
        """Flush the host file, after the table writes of every allocation acknowledged so far
        (write-back: see ``alloc.WriteBackAllocation``). Once a table write of an acknowledged
        allocation has failed, every flush fails with its error until the image is reopened
        (``close`` raises it too): that allocation's mapping is not in the file, so nothing since
        can be promised durable; the image stays marked for repair. With cache="unsafe" the host
        file is not flushed, but the table writes are still waited for and their failure
        reported (``writer.TableWriter.flush``)."""
        return self.writer.flush()

    def batch(self):
        return self._f.batch()

    def start_writeback(self):
        self._f.start_writeback()

    def submit_write_zeroes(self, offset, length, may_unmap):
        cs = self.geo.cluster_size
        a = -(-offset // cs) * cs
        b = (offset + length) // cs * cs
        if a >= b:
            return None  # no whole cluster: the block layer writes zeros as data
        if a != offset or b != offset + length:
            return self.state.track(self._on_pool(self._zeroes_split, offset, length, a, b))
        return self.state.track(self._on_pool(self._write_slow, a, None, b - a, True))

    def _zeroes_split(self, offset, length, a, b):
        for lo, hi in ((offset, a), (b, offset + length)):
            if hi > lo:
                self._write_slow(lo, [self._f.alloc(hi - lo)], hi - lo, False)
        self._write_slow(a, None, b - a, True)
        return None

    def submit_discard(self, offset, length):
        """Punch holes for whole discarded clusters that are allocated; keep the mapping."""
        return self.state.track(self._on_pool(self._discard, offset, length))

    def _discard(self, offset, length):
        cs = self.geo.cluster_size
        a = -(-offset // cs) * cs
        b = (offset + length) // cs * cs
        if a >= b:
            return None
        futs = []
        for _pos, kind, n, host in lookup.runs(
            self.geo, self._table_or_none, a, b - a, self.state.file_size
        ):
            if kind is lookup.FOUND:
                futs.append(self._f.submit_discard(host, n))
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
        for pos, kind, n, host in lookup.runs(
            self.geo, self._table_or_none, offset, length, self.state.file_size
        ):
            if kind is lookup.INVALID:
                raise self.state.invalid(pos, host)
            k = kinds[kind]
            last = out[-1] if out else None
            if (
                last is not None
                and last.kind == k
                and last.offset + last.length == pos
                and (k != DATA or last.host_offset + last.length == host)
            ):
                out[-1] = last._replace(length=last.length + n)  # runs split by L2 boundaries
            else:
                out.append(Run(pos, n, k, host if k == DATA else None))
        return out

    def truncate(self, size):
        if size < self.size:
            raise UnsupportedError(f"{self.path}: shrinking QED images is not supported")
        h = self.state.header
        if not fmt.image_size_valid(size, h.cluster_size, h.table_size):
            raise ValueError(f"{self.path}: invalid QED image size {size}")
        header.write(self.state, image_size=size)
        if not self.state.unsafe:
            self._f.flush()
        self.size = size

    def info(self):
        h = self.state.header
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
            d["full-backing-filename"] = (
                self.backing.path
                if self.backing is not None
                else backing_path(self.path, self.backing_filename)
            )
        return d

    def change_backing(self, name, fmt_name=None):
        """Point the image at another backing file (or none): header and name rewritten together,
        features recomputed (NO_PROBE only for raw), as ``qemu-img rebase -u`` does."""
        st = self.state
        if st.header.compat_features & ~fmt.COMPAT_FEATURE_MASK:
            raise UnsupportedError(f"{self.path}: unknown compat features are set")
        raw = b""
        if name:
            raw = name.encode("utf-8", "surrogateescape")
            if fmt.HEADER_SIZE + len(raw) > self.geo.header_bytes or len(raw) >= 4096:
                raise OSError(errno.ENOSPC, f"{self.path}: backing file name too long")
        header.write_backing_name(st, raw, fmt_name)
        old, st.backing = st.backing, None
        self.backing_filename = name or None
        if old is not None:
            old.close()
        if name:
            self._open_backing()

    def check(self, repair=False):
        """qemu-img check's counters (see check.py). With ``repair``: zero invalid entries, reclaim
        leaked clusters (fill interior ones from the end of the file, truncate, punch holes for any
        left), clear need-check."""
        self.state.drain()
        return checkmod.check_image(self.state, repair, self.needcheck, self.growth)

    # -- close -----------------------------------------------------------------------------------
    def close(self):
        if self._closed:
            return
        self._closed = True
        st = self.state
        try:
            st.drain()
            self.needcheck.stop()
            if self.pool is not None:
                self.pool.shutdown(wait=True)
            if not self.read_only:
                self.growth.trim()
                if not st.unsafe:  # cache="unsafe": flushes do nothing, close included
                    self._f.flush()
                if not st.damaged:
                    self.needcheck.clear_now(flush=not st.unsafe)
        finally:
            self._teardown()
        if st.meta_error is not None:
            # An acknowledged write's table update failed (see submit_flush): say so here too,
            # for callers that close without flushing (cache="unsafe" conversions do).
            raise st.meta_error

    def _teardown(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        st = self.state
        if st is not None and st.backing is not None:
            st.backing.close()
            st.backing = None
        self._f.close()

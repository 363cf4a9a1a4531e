"""The qcow2 driver: QEMU's qcow2 images (versions 2 and 3), read-only.

Opening read-write is refused (``UnsupportedError``) with a pointer to conversion: vblock writes
QED, and ``vblock convert -O qed`` turns a qcow2 into one. Encrypted images and images with an
external data file are refused the same way, with one line naming what is not supported.

Reading (``submit_read``, any thread): the request is translated into runs (``lookup.py``) and
every run becomes one host read, a zero fill, a read of the backing image, or a decompressed
cluster. L2 tables come from a bounded cache shared by all requests (``vblock.drivers.qed.cache``,
the QED driver's: a table that many requests miss at once is read once). A request whose tables
are cached and that holds no compressed cluster is served from the calling thread; the others
(table loads, decompression) run on the driver's small thread pool.

Hostile images: the header and every table it names are checked against the file and against
QEMU's size limits at open (``format.parse_header``), each L2 table offset and data offset when
first used; what is wrong raises ``ImageError`` naming the field (``l1_table`` for a bad L2
offset, ``l2_table`` for a bad data or compressed cluster entry). Nothing is read outside the
file, allocations are bounded by the cluster size and the table limits, and loops in a backing
chain are refused by the block layer's backing opener.

Threads: ``self.lock`` guards the L2 cache and is never held across I/O.
"""

from __future__ import annotations

import os
import threading
from array import array
from concurrent.futures import ThreadPoolExecutor

from vblock.block.backing import backing_path
from vblock.block.interface import DATA, UNALLOCATED, ZERO, BlockDriver, Limits, Run
from vblock.block.iov import slice_views, zero_fill
from vblock.drivers.qed.cache import L2Cache, wait_loaded
from vblock.errors import ImageError, UnsupportedError
from vblock.future import Future, completed, failed, join, resolve
from vblock.hostio import open_host_file
from vblock.hostio.engine import float_thread

from . import compress, lookup
from . import format as fmt

__all__ = ["Qcow2Driver"]

DEFAULT_POOL_SIZE = 4  # threads
CACHE_BYTES = 16 << 20  # default bound of the L2 cache, in table bytes


def _copy_into(views, data):
    pos = 0
    for v in views:
        n = len(v)
        v[:] = data[pos : pos + n]
        pos += n


def _be_table(buf) -> array:
    t = array("Q")
    t.frombytes(bytes(buf))
    if t.itemsize != 8:  # pragma: no cover - every platform CPython supports has 8-byte Q
        raise RuntimeError("array('Q') is not 64-bit")
    import sys

    if sys.byteorder == "little":
        t.byteswap()
    return t


def read_only_refusal(path) -> UnsupportedError:
    return UnsupportedError(
        f"{path}: qcow2 images are read-only in vblock; convert it to QED first "
        f"(vblock convert -O qed {path} NEW.qed, or vblock convert --in-place -O qed {path})"
    )


class Qcow2Driver(BlockDriver):
    format_name = "qcow2"
    open_options = {
        "l2_cache_size": int,  # tables
        "pool_size": int,  # threads for table loads and decompression
    }

    # -- class-level -------------------------------------------------------------------------------
    @classmethod
    def probe(cls, head, path):
        return fmt.probe(head)

    @classmethod
    def open(cls, path, options):
        if not options.read_only:
            raise read_only_refusal(path)
        return cls(path, options)

    # -- open --------------------------------------------------------------------------------------
    def __init__(self, path, options):
        self.path = os.fspath(path)
        self.read_only = True
        self.options = options
        self._backing = None
        self.pool = None
        self._closed = False
        self._host_holes = None
        # Reads go through the page cache (compressed clusters lie at byte offsets). There the
        # thread engine's plain preadv beats io_uring, which hands large buffered reads to its
        # own workers: "auto" means threads for this driver.
        engine = "threads" if options.aio == "auto" else options.aio
        self.f = open_host_file(self.path, direct=False, engine=engine, read_only=True)
        try:
            self._open(options.driver_options)
        except BaseException:
            self._teardown()
            raise

    def _open(self, dopts):
        f = self.f
        self.file_size = length = f.size
        head = f.alloc(4096)
        n = f.pread(head, 0) if length else 0
        if n < fmt.V2_HEADER_LENGTH or bytes(head[:4]) != fmt.MAGIC:
            raise ImageError(self.path, "magic", "Image is not in qcow2 format")
        cbits = int.from_bytes(head[20:24], "big")
        cs = 1 << cbits if fmt.MIN_CLUSTER_BITS <= cbits <= fmt.MAX_CLUSTER_BITS else 4096
        if cs > 4096:
            head = f.alloc(cs)
            n = f.pread(head, 0)
        h = self.header = fmt.parse_header(head[: min(n, cs)], length, self.path)
        if h.crypt_method:
            kind = {1: "AES", 2: "LUKS"}[h.crypt_method]
            raise UnsupportedError(
                f"{self.path}: encrypted qcow2 images ({kind}) are not supported"
            )
        if h.incompatible_features & fmt.INCOMPAT_DATA_FILE or h.data_file is not None:
            raise UnsupportedError(
                f"{self.path}: qcow2 images with an external data file are not supported yet"
            )
        self.size = h.virtual_size
        self.cluster_size = cs
        self._file_end = -(-length // cs) * cs  # the end of the file's last (partial) cluster
        self.backing_filename = h.backing_file if h.backing_file_offset else None
        self.limits = Limits(
            request_alignment=1,
            mem_alignment=1,
            max_transfer=1 << 30,
            discard_alignment=cs,
            write_zeroes_alignment=cs,
        )
        self.l1 = self._read_table(h.l1_table_offset, h.l1_size * 8) if h.l1_size else array("Q")
        self.snapshots = self._read_snapshots()
        self.lock = threading.Lock()
        capacity = dopts.get("l2_cache_size") or max(16, min(1024, CACHE_BYTES // cs))
        self.cache = L2Cache(capacity, self.lock)
        self.pool = ThreadPoolExecutor(
            max_workers=dopts.get("pool_size", DEFAULT_POOL_SIZE),
            thread_name_prefix="qcow2",
            initializer=float_thread,
        )
        if self.backing_filename is not None:
            self._backing = self.options.open_backing(
                self.path, self.backing_filename, h.backing_format
            )

    def _read_table(self, offset, nbytes) -> array:
        buf = bytearray(nbytes)
        got = self.f.pread(buf, offset)
        if got < nbytes:
            raise ImageError(self.path, "l1_table_offset", "table lies past the end of file")
        return _be_table(buf)

    def _read_snapshots(self) -> list:
        h = self.header
        if not h.nb_snapshots:
            return []
        # each entry is at most 40 + 1024 + 2 * 65535 bytes; read what the file holds, bounded
        most = min(
            h.nb_snapshots * (40 + fmt.MAX_SNAPSHOT_EXTRA + 2 * 65535 + 8),
            fmt.MAX_SNAPSHOT_TABLE_BYTES,
            self.file_size - h.snapshots_offset,
        )
        buf = bytearray(most)
        got = self.f.pread(buf, h.snapshots_offset)
        return fmt.parse_snapshots(memoryview(buf)[:got], h.nb_snapshots, h.version, self.path)

    @property
    def backing(self):
        return self._backing

    # -- tables ------------------------------------------------------------------------------------
    def _l2_offset(self, l1_index):
        """The L2 table offset of ``l1_index`` (0: unallocated), checked against the file."""
        if l1_index >= len(self.l1):
            return 0
        off = self.l1[l1_index] & fmt.L1_OFFSET_MASK
        if off and (off % self.cluster_size or off + self.cluster_size > self.file_size):
            raise ImageError(
                self.path,
                "l1_table",
                f"L1 entry {l1_index} holds an invalid L2 table offset {off:#x}"
                + (" (unaligned)" if off % self.cluster_size else " (past the end of file)"),
            )
        return off

    def _peek(self, l1_index):
        """(known, table or None) without I/O."""
        if l1_index >= len(self.l1):
            return True, None
        raw = self.l1[l1_index] & fmt.L1_OFFSET_MASK
        if not raw:
            return True, None
        table = self.cache.peek(raw)
        return table is not None, table

    def _table(self, l1_index):
        """The L2 table for ``l1_index`` (loading it if needed), or None when unallocated."""
        off = self._l2_offset(l1_index)
        if not off:
            return None
        with self.lock:
            entry, must_load = self.cache.acquire(off)
        try:
            if must_load:
                try:
                    table = self._read_table(off, self.cluster_size)
                except BaseException as exc:
                    with self.lock:
                        fut = self.cache.load_failed(entry)
                    fut.set_exception(exc)
                    raise
                with self.lock:
                    fut = self.cache.loaded(entry, table)
                fut.set_result(table)
                return table
            return wait_loaded(entry)
        finally:
            with self.lock:
                self.cache.release(entry)

    def _segments(self, offset, length, loading):
        """The runs of [offset, offset+length), or None when a table is not cached and
        ``loading`` is False."""
        if loading:
            return list(lookup.runs(self.header, self._table, offset, length))

        class _Miss(Exception):
            pass

        def get(l1i):
            known, table = self._peek(l1i)
            if not known:
                raise _Miss
            return table

        try:
            return list(lookup.runs(self.header, get, offset, length))
        except _Miss:
            return None

    # -- read --------------------------------------------------------------------------------------
    def _bad_entry(self, seg, why):
        cs = self.cluster_size
        cluster = seg.pos // cs
        return ImageError(
            self.path,
            "l2_table",
            f"{why} (guest offset {seg.pos:#x}, L2 index {cluster % self.header.l2_entries})",
        )

    def _check(self, seg):
        """None if ``seg`` may be served, else the ImageError to fail the request with."""
        kind = seg.kind
        if kind is fmt.INVALID:
            if self.header.version < 3 and not self.header.extended_l2:
                return self._bad_entry(seg, "Zero cluster entry found in pre-v3 image")
            return self._bad_entry(seg, "Invalid cluster entry found")
        if kind is fmt.NORMAL or kind is fmt.ZERO_ALLOC:
            cluster_start = seg.host - seg.pos % self.cluster_size
            if cluster_start % self.cluster_size:
                return self._bad_entry(
                    seg, f"Cluster allocation offset {cluster_start:#x} unaligned"
                )
            # the last cluster of the file may be partly written (reads zeros past the end)
            if kind is fmt.NORMAL and seg.host + seg.n > self._file_end:
                return self._bad_entry(
                    seg, f"data cluster at {cluster_start:#x} lies past the end of file"
                )
        if kind is fmt.COMPRESSED:
            off, _ = fmt.compressed_extent(seg.entry, self.header.cluster_bits)
            if off >= self.file_size:
                return self._bad_entry(
                    seg, f"compressed cluster at {off:#x} lies past the end of file"
                )
        return None

    def submit_read(self, offset, buffers):
        length = sum(len(b) for b in buffers)
        segs = self._segments(offset, length, loading=False)
        if segs is None or any(s.kind is fmt.COMPRESSED for s in segs):
            out = Future()
            self.pool.submit(resolve, out, self._read_slow, offset, buffers, length)
            return out
        return self._serve(offset, buffers, length, segs)

    def _read_slow(self, offset, buffers, length):
        segs = self._segments(offset, length, loading=True)
        return self._serve(offset, buffers, length, segs)

    def _serve(self, offset, buffers, length, segs):
        for s in segs:  # fail before any I/O touches the caller's buffers
            err = self._check(s)
            if err is not None:
                return failed(err)
        if (
            len(segs) == 1
            and segs[0].kind is fmt.NORMAL
            and segs[0].host + length <= self.file_size
        ):
            return self.f.submit_read(segs[0].host, buffers)
        futs = []
        for s in segs:
            views = buffers if len(segs) == 1 else slice_views(buffers, s.pos - offset, s.n)
            kind = s.kind
            if kind is fmt.NORMAL:
                inside = max(0, min(s.n, self.file_size - s.host))
                if inside < s.n:
                    zero_fill(slice_views(views, inside, s.n - inside))
                    views = slice_views(views, 0, inside)
                if inside:
                    futs.append(self.f.submit_read(s.host, views))
            elif kind is fmt.COMPRESSED:
                _copy_into(views, self._cluster_bytes(s)[s.pos % self.cluster_size :][: s.n])
            elif (
                kind is fmt.UNALLOCATED or kind is fmt.UNALLOCATED_ALLOC
            ) and self._backing is not None:
                fut = self._read_backing(s.pos, views, s.n)
                if fut is not None:
                    futs.append(fut)
            else:
                zero_fill(views)
        return join(futs, length)

    def _cluster_bytes(self, seg) -> bytes:
        """The decompressed guest cluster holding ``seg`` (a COMPRESSED run)."""
        h = self.header
        off, csize = fmt.compressed_extent(seg.entry, h.cluster_bits)
        csize = min(csize, self.file_size - off)
        buf = bytearray(csize)
        got = self.f.pread(buf, off)
        try:
            return compress.decompress(memoryview(buf)[:got], self.cluster_size, h.compression_type)
        except ValueError as exc:
            raise self._bad_entry(seg, f"compressed cluster at {off:#x}: {exc}") from None

    def _read_backing(self, pos, views, n):
        """Read [pos, pos+n) from the backing image into ``views``; zeros past its end."""
        inside = max(0, min(n, self._backing.size - pos))
        if inside < n:
            zero_fill(slice_views(views, inside, n - inside))
        if inside == 0:
            return None
        return self._backing.submit_read(
            pos, slice_views(views, 0, inside) if inside < n else views
        )

    def submit_write(self, offset, buffers, fua=False):  # pragma: no cover - never opened rw
        return failed(read_only_refusal(self.path))

    def submit_flush(self):
        return completed(None)

    # -- metadata ----------------------------------------------------------------------------------
    def block_status(self, offset, length):
        out = []
        for s in lookup.runs(self.header, self._table, offset, length):
            err = self._check(s)
            if err is not None:
                raise err
            kind = s.kind
            if kind is fmt.NORMAL:
                run = Run(s.pos, s.n, DATA, s.host)
            elif kind is fmt.COMPRESSED:
                run = Run(s.pos, s.n, DATA, None)
            elif kind is fmt.ZERO_ALLOC:
                run = Run(s.pos, s.n, ZERO, s.host)
            elif kind is fmt.ZERO_PLAIN:
                run = Run(s.pos, s.n, ZERO, None)
            elif kind is fmt.UNALLOCATED_ALLOC:
                run = Run(s.pos, s.n, UNALLOCATED, s.host)
            else:
                run = Run(s.pos, s.n, UNALLOCATED, None)
            last = out[-1] if out else None
            if (
                last is not None
                and last.kind == run.kind
                and last.offset + last.length == run.offset
                and (last.host_offset is None) == (run.host_offset is None)
                and (run.host_offset is None or last.host_offset + last.length == run.host_offset)
                and kind is not fmt.COMPRESSED
            ):
                out[-1] = last._replace(length=last.length + run.length)
            else:
                out.append(run)
        return out

    @property
    def reports_host_holes(self) -> bool:
        """True when QEMU's map reports holes of the host file inside data clusters as zeros:
        for images that look made with ``preallocation=metadata`` (``check.py`` says how QEMU
        guesses that). Computed once, on first use."""
        if self._host_holes is None:
            from . import check as checkmod

            self._host_holes = checkmod.looks_metadata_preallocated(self)
        return self._host_holes

    def info(self):
        h = self.header
        data = {
            "compat": "1.1" if h.version >= 3 else "0.10",
            "compression-type": fmt.COMPRESSION_NAMES[h.compression_type],
        }
        if h.version >= 3:
            data["lazy-refcounts"] = h.lazy_refcounts
        data["refcount-bits"] = h.refcount_bits
        if h.version >= 3:
            data["corrupt"] = h.corrupt
            data["extended-l2"] = h.extended_l2
        d = {
            "cluster-size": self.cluster_size,
            "dirty-flag": h.dirty,
            "actual-size": os.stat(self.path).st_blocks * 512,
            "format-specific": {"type": "qcow2", "data": data},
        }
        if self.snapshots:
            d["snapshots"] = [s.info() for s in self.snapshots]
        if self.backing_filename is not None:
            d["backing-filename"] = self.backing_filename
            if h.backing_format is not None:
                d["backing-filename-format"] = h.backing_format
            d["full-backing-filename"] = (
                self._backing.path
                if self._backing is not None
                else backing_path(self.path, self.backing_filename)
            )
        return d

    def check(self, repair=False):
        from . import check as checkmod

        if repair:  # pragma: no cover - the block layer refuses repairs on read-only images
            raise read_only_refusal(self.path)
        return checkmod.check(self)

    # -- close -------------------------------------------------------------------------------------
    def close(self):
        if self._closed:
            return
        self._closed = True
        self._teardown()

    def _teardown(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None
        if self._backing is not None:
            self._backing.close()
            self._backing = None
        if self.f is not None:
            self.f.close()
            self.f = None

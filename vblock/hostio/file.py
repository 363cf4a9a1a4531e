"""``HostFile``: one open host file (regular file or block device) with aligned, batched I/O.

Offsets and lengths are bytes. With ``direct=True`` the file is opened with O_DIRECT and every
offset, length and buffer address must be a multiple of the alignment the kernel reports
(``alignment`` for offsets and lengths, ``mem_alignment`` for addresses); a misaligned request raises
``ValueError`` before any syscall. ``alloc()`` returns buffers that satisfy both.

Synchronous methods (``pread``, ``pwrite``, ``flush``, ...) run in the calling thread with the GIL
released. ``submit_*`` methods queue the operation on the file's engine and return a
``vblock.future.Future`` completed on one of the engine's threads; the caller keeps the buffers
unchanged until then (the file keeps them alive). Host failures raise (or complete the future with)
``OSError`` carrying the errno, the operation, the path and the offset. ``close()`` waits for every
in-flight request; operations on a closed file fail with EBADF.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from typing import TYPE_CHECKING, Any

from ._binding import EBADF, EINVAL, ENXIO, check, ffi, host_error, lib
from .engine import Engine, resolve_engine

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence

    from vblock.future import Future

_log = logging.getLogger("vblock.hostio")

PAGE = 4096
SEEK_DATA = lib.VBIO_SEEK_DATA
SEEK_HOLE = lib.VBIO_SEEK_HOLE


def alloc_buffer(length: int, alignment: int = PAGE) -> memoryview:
    """A zero-filled, ``alignment``-aligned, writable ``memoryview`` (format ``'B'``) of ``length``
    bytes, freed when the last reference to it goes away.

    The memory is an anonymous ``mmap`` (page-aligned by construction), which Python's garbage
    collector handles safely whatever cycles the view ends up in.
    """
    if length < 0:
        raise ValueError(f"buffer length must be >= 0, got {length}")
    if alignment <= PAGE:
        return memoryview(mmap.mmap(-1, max(length, 1)))[:length]
    m = memoryview(mmap.mmap(-1, length + alignment))
    skip = -address_of(ffi.from_buffer(m)) % alignment
    return m[skip : skip + length]


def address_of(cbuf: Any) -> int:
    """Address of a ``ffi.from_buffer`` cdata, as an int."""
    return int(ffi.cast("uintptr_t", cbuf))


_from_buffer = ffi.from_buffer
_cast = ffi.cast
_CHAR_ARRAY = ffi.typeof("char[]")  # ctype objects: no type parsing per call
_UINTPTR = ffi.typeof("uintptr_t")


def buffer_address(view: Any) -> int:
    """The address of the first byte of a contiguous buffer (read-only buffers included), for
    alignment decisions above this layer."""
    return int(_cast(_UINTPTR, _from_buffer(_CHAR_ARRAY, view, False)))


def buffers_aligned(views: Sequence[Any], align: int, mem_align: int) -> bool:
    """Whether every buffer's length is a multiple of ``align`` and its address a multiple of
    ``mem_align``, checked by one native call (for requests of many buffers; one buffer is as
    cheap with ``buffer_address``)."""
    cbufs = [_from_buffer(_CHAR_ARRAY, v, False) for v in views]
    return not lib.vbio_misaligned(0, cbufs, [len(c) for c in cbufs], len(cbufs), align, mem_align)


class HostFile:
    """An open host file. See the module docstring for the contract.

    Args:
        path: file or block device path.
        direct: True for O_DIRECT (``OSError(EINVAL)`` naming the path if the file system refuses
            it), False for the page cache, or ``"try"`` to fall back to the page cache silently.
        engine: "auto" | "io_uring" | "threads" (see ``vblock.hostio.engine``).
        read_only: open O_RDONLY; writes fail with EBADF from the kernel.
        create: create the file if it does not exist.
        threads: worker threads of the thread engine (requests it can run at once).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        direct: bool = True,
        engine: str = "auto",
        read_only: bool = False,
        create: bool = False,
        threads: int = 16,
    ) -> None:
        if direct not in (True, False, "try"):
            raise ValueError(f"direct must be True, False or 'try', got {direct!r}")
        self.path = os.fsdecode(path)
        self.read_only = bool(read_only)
        self._fd = -1
        self._engine = None
        kind = resolve_engine(engine)
        flags = (lib.VBIO_O_RDONLY if read_only else 0) | (lib.VBIO_O_CREATE if create else 0)
        fdp = ffi.new("int *")
        bpath = os.fsencode(self.path)
        ret = lib.vbio_open(bpath, flags | (lib.VBIO_O_DIRECT if direct else 0), fdp)
        if ret == -EINVAL and direct:
            if direct != "try":
                exc = host_error(EINVAL, "open with O_DIRECT", self.path)
                exc.strerror += (
                    ": the file system refuses O_DIRECT; use direct='try' or the page cache"
                )
                raise exc
            ret = lib.vbio_open(bpath, flags, fdp)
            direct = False
        check(ret, "open", self.path)
        self._fd = fdp[0]
        self.direct = bool(direct)
        if self.direct:
            a, m = ffi.new("uint32_t *"), ffi.new("uint32_t *")
            lib.vbio_dio_align(self._fd, a, m)
            self.alignment, self.mem_alignment = int(a[0]), int(m[0])
        else:
            self.alignment, self.mem_alignment = 1, 1
        self.is_block_device = lib.vbio_is_blockdev(self._fd) == 1
        try:
            # page-cache I/O gains nothing from polling or spinning (see vblock.hostio.engine)
            busy = None if self.direct else 0
            self._engine = Engine(kind, self.path, threads=threads, poll_depth=busy, spin_us=busy)
        except BaseException:
            lib.vbio_close(self._fd)
            self._fd = -1
            raise
        _log.debug(
            "opened %s (direct=%s, alignment=%d/%d, engine=%s)",
            self.path,
            self.direct,
            self.alignment,
            self.mem_alignment,
            kind,
        )

    # -- properties -------------------------------------------------------------------------------
    @property
    def engine(self) -> str:
        """The engine serving this file: "io_uring" or "threads"."""
        return self._engine.kind

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    @property
    def size(self) -> int:
        """Current length of the file (or block device) in bytes."""
        out = ffi.new("int64_t *")
        check(lib.vbio_size(self._live_fd("stat"), out), "stat", self.path)
        return int(out[0])

    def alloc(self, length: int) -> memoryview:
        """A zeroed buffer aligned for this file's direct I/O (page-aligned)."""
        return alloc_buffer(length, max(PAGE, self.mem_alignment))

    # -- checks -----------------------------------------------------------------------------------
    def _live_fd(self, op, offset=None):
        if self._fd < 0:
            raise host_error(EBADF, op, self.path, offset)
        return self._fd

    def _cbufs(self, buffers, writable, offset, op):
        """``ffi.from_buffer`` views of ``buffers``, checked for O_DIRECT alignment.

        Error paths release the views before raising: a ``from_buffer`` view of a memoryview that
        lingers in a traceback's frames can crash CPython 3.11's garbage collector (the memoryview
        is cleared while still exported), so no frame that raises may hold one.
        """
        if offset < 0:
            raise ValueError(f"{op} {self.path}: negative offset {offset}")
        cbufs = [ffi.from_buffer(b, require_writable=writable) for b in buffers]
        if self.direct:
            problem = self._misalignment(cbufs, offset)
            if problem:
                for c in cbufs:
                    ffi.release(c)
                del cbufs
                raise ValueError(f"{op} {self.path}: {problem}")
        return cbufs

    def _misalignment(self, cbufs, offset):
        a, m = self.alignment, self.mem_alignment
        if offset % a:
            return f"offset {offset} is not a multiple of the O_DIRECT alignment {a}"
        for i, c in enumerate(cbufs):
            if len(c) % a:
                return (
                    f"length {len(c)} of buffer {i} is not a multiple of the O_DIRECT alignment {a}"
                )
            if address_of(c) % m:
                return f"buffer {i} address is not a multiple of the O_DIRECT memory alignment {m}"
        return None

    # -- synchronous I/O --------------------------------------------------------------------------
    def pread(self, buf: Any, offset: int) -> int:
        """Read ``len(buf)`` bytes at ``offset`` into ``buf``; returns the count, short only at EOF."""
        return self.preadv([buf], offset)

    def pwrite(self, buf: Any, offset: int) -> int:
        """Write all of ``buf`` at ``offset``; returns the count."""
        return self.pwritev([buf], offset)

    def preadv(self, buffers: Sequence[Any], offset: int) -> int:
        return check(
            self._sync_rw(lib.vbio_preadv, buffers, True, offset, "read"), "read", self.path, offset
        )

    def pwritev(self, buffers: Sequence[Any], offset: int) -> int:
        return check(
            self._sync_rw(lib.vbio_pwritev, buffers, False, offset, "write"),
            "write",
            self.path,
            offset,
        )

    def _sync_rw(self, fn, buffers, writable, offset, op):
        """Run one preadv/pwritev; returns the count or -errno (raising is left to the caller, so
        that no frame holding buffer views ends up in a traceback)."""
        fd = self._live_fd(op, offset)
        cbufs = self._cbufs(buffers, writable, offset, op)
        ret = fn(fd, self._iovec(cbufs), len(cbufs), offset)
        for c in cbufs:
            ffi.release(c)
        return ret

    @staticmethod
    def _iovec(cbufs):
        iov = ffi.new("struct iovec[]", len(cbufs))
        for i, c in enumerate(cbufs):
            iov[i].iov_base = c
            iov[i].iov_len = len(c)
        return iov

    def flush(self) -> None:
        """fdatasync: everything written before this call is durable when it returns."""
        check(lib.vbio_fdatasync(self._live_fd("flush")), "flush", self.path)

    def start_writeback(self, offset: int = 0, length: int = 0) -> None:
        """Start writing the page cache's dirty pages of [offset, offset+length) (length 0: to the
        end of the file) to the device, without waiting for them: a later ``flush`` has that much
        less to do. Not a durability promise; nothing to do for an O_DIRECT file."""
        if offset < 0 or length < 0:
            raise ValueError(
                f"start writeback {self.path}: negative offset or length ({offset}, {length})"
            )
        fd = self._live_fd("start writeback", offset)
        if not self.direct:
            check(
                lib.vbio_start_writeback(fd, offset, length), "start writeback", self.path, offset
            )

    def discard(self, offset: int, length: int) -> None:
        """Punch a hole (keeping the size): the range reads zeros and its space returns to the
        file system. ``OSError(EOPNOTSUPP)`` where the file system cannot."""
        self._fallocate(
            lib.VBIO_FALLOC_PUNCH_HOLE | lib.VBIO_FALLOC_KEEP_SIZE, offset, length, "discard"
        )

    def zero_range(self, offset: int, length: int, unmap: bool = False) -> None:
        """Make the range read zeros: FALLOC_FL_ZERO_RANGE, or a punched hole with ``unmap``."""
        mode = (
            (lib.VBIO_FALLOC_PUNCH_HOLE | lib.VBIO_FALLOC_KEEP_SIZE)
            if unmap
            else lib.VBIO_FALLOC_ZERO_RANGE
        )
        self._fallocate(mode, offset, length, "zero range")

    def allocate(self, offset: int, length: int) -> None:
        """Give [offset, offset+length) disk blocks that read as zeros (fallocate mode 0), growing
        the file if the range ends past it. Writes into allocated blocks need no allocation by
        the file system on their way: an O_DIRECT write into a hole cannot be issued without
        blocking, and io_uring hands it to a worker thread. ``OSError(EOPNOTSUPP)`` where the
        file system cannot, ``ENOSPC`` when the space is not there."""
        self._fallocate(0, offset, length, "allocate")

    def _fallocate(self, mode, offset, length, op):
        if offset < 0 or length < 0:
            raise ValueError(f"{op} {self.path}: negative offset or length ({offset}, {length})")
        check(
            lib.vbio_fallocate(self._live_fd(op, offset), mode, offset, length),
            op,
            self.path,
            offset,
            length,
        )

    def truncate(self, size: int) -> None:
        """Set the file's length to ``size`` bytes."""
        if size < 0:
            raise ValueError(f"truncate {self.path}: negative size {size}")
        check(
            lib.vbio_ftruncate(self._live_fd("truncate", size), size), "truncate", self.path, size
        )

    def seek_data(self, offset: int) -> int | None:
        """Offset of the first data byte at or after ``offset``, or None if there is none."""
        return self._seek(offset, SEEK_DATA)

    def seek_hole(self, offset: int) -> int | None:
        """Offset of the first hole at or after ``offset`` (the file's end counts as a hole)."""
        return self._seek(offset, SEEK_HOLE)

    def _seek(self, offset, whence):
        ret = lib.vbio_seek(self._live_fd("seek", offset), offset, whence)
        if ret == -ENXIO:
            return None
        return check(ret, "seek", self.path, offset)

    # -- asynchronous I/O -------------------------------------------------------------------------
    def submit_read(self, offset: int, buffers: Sequence[Any]) -> Future:
        """Read into ``buffers`` (filled in order) at ``offset``; future result: bytes read."""
        return self._submit_rw(False, offset, buffers, "read")

    def submit_write(self, offset: int, buffers: Sequence[Any]) -> Future:
        """Write ``buffers`` (in order) at ``offset``; future result: bytes written."""
        return self._submit_rw(True, offset, buffers, "write")

    def _submit_rw(self, write, offset, buffers, op):
        fd = self._fd
        if fd < 0:
            raise host_error(EBADF, op, self.path, offset)
        if offset < 0:
            raise ValueError(f"{op} {self.path}: negative offset {offset}")
        align, mem_align = (self.alignment, self.mem_alignment) if self.direct else (1, 1)
        # The hot paths: the buffers' iovecs filled and checked by one native call.
        if len(buffers) == 1:
            c = ffi.from_buffer(buffers[0], require_writable=not write)
            fut = self._engine.submit1(write, fd, offset, c, align, mem_align)
            cbufs = None
        else:  # a guest's scattered pages (16 x 4 KiB for a Linux guest's 64 KiB request), or none
            cbufs = [ffi.from_buffer(b, require_writable=not write) for b in buffers]
            fut = self._engine.submitv(write, fd, offset, cbufs, align, mem_align)
        if fut.__class__ is int:  # misaligned: say which, holding no buffer view (see _cbufs)
            if cbufs is None:
                cbufs = [c]
            c = None
            problem = self._misalignment(cbufs, offset)
            while cbufs:
                ffi.release(cbufs.pop())
            raise ValueError(f"{op} {self.path}: {problem}")
        return fut

    def submit_flush(self) -> Future:
        return self._engine.submit_simple(lib.VBIO_OP_FDATASYNC, self._live_fd("flush"))

    def submit_discard(self, offset: int, length: int) -> Future:
        mode = lib.VBIO_FALLOC_PUNCH_HOLE | lib.VBIO_FALLOC_KEEP_SIZE
        return self._engine.submit_simple(
            lib.VBIO_OP_FALLOCATE, self._live_fd("discard", offset), offset, length, mode
        )

    def submit_zero_range(self, offset: int, length: int, unmap: bool = False) -> Future:
        mode = (
            (lib.VBIO_FALLOC_PUNCH_HOLE | lib.VBIO_FALLOC_KEEP_SIZE)
            if unmap
            else lib.VBIO_FALLOC_ZERO_RANGE
        )
        return self._engine.submit_simple(
            lib.VBIO_OP_FALLOCATE, self._live_fd("zero range", offset), offset, length, mode
        )

    @contextlib.contextmanager
    def batch(self) -> Iterator[HostFile]:
        """Collect this thread's submissions and hand them to the kernel in one call at exit."""
        outer = self._engine.begin_batch()
        try:
            yield self
        finally:
            if outer:
                self._engine.end_batch()

    def push(self) -> None:
        """Submit this thread's collected requests now (see ``Engine.push``); a no-op outside a
        batch or a completion callback."""
        if self._engine is not None:
            self._engine.push()

    def inflight(self) -> int:
        """Requests submitted and not yet completed."""
        return self._engine.inflight() if self._engine else 0

    # -- lifetime ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Wait for in-flight requests, then close. Idempotent."""
        if self._engine is not None:
            self._engine.close()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            lib.vbio_close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_fd", -1) >= 0:
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self):
        state = "closed" if self.closed else f"{self.engine}, direct={self.direct}"
        return f"<HostFile {self.path!r} {state}>"

"""A fault-injecting host file: simulated power loss, torn writes, and EIO / ENOSPC on chosen
operations. Usable from any test that opens images through ``vblock.open_image``.

Theory of operation
-------------------
``FaultyHostFile`` has the ``vblock.hostio.HostFile`` API and sits on a real file (page cache, so
reads see every write, as they would on a real machine before a crash). Every write-type operation
(write, truncate, discard, zero range) is numbered and, until a flush completes, kept in a
*volatile* log together with what it overwrote. A completed flush makes everything before it
durable and empties the log.

A ``FaultPlan`` decides what goes wrong:

* ``crash_after=k``: the first ``k`` write-type operations reach the file; the next one and every
  operation after it fail with EIO, as if the machine had lost power there (``crashed`` is then
  True). ``FaultyHostFile.settle_crash(rng)`` then rewrites the real file as the disk could look
  after power returns: every volatile operation undone, then an arbitrary subset of them replayed
  in order, each possibly torn at 512-byte boundaries (any subset of its sectors).
* ``fail={n: errno}`` fails write-type operation number ``n`` (0-based), and ``fail_points=
  {"L2_UPDATE": errno}`` fails the first write issued inside that named point; the operation does
  not happen, the caller sees ``OSError(errno)``, and later operations proceed.

Named points are announced by drivers with ``vblock.hostio.io_point(name)`` or ``announce(name)``
(QED announces ``HEADER_UPDATE``, ``DATA_WRITE``, ``DATA_FLUSH``, ``L2_ALLOC``, ``L2_FLUSH``,
``L2_UPDATE``, ``L1_UPDATE``, ``L2_REPAIR``, ``L1_REPAIR``, ``NEED_CHECK_CLEARED``).

``install(plan)`` makes every image opened through ``vblock.hostio.open_host_file`` (as drivers
do) use a ``FaultyHostFile`` driven by ``plan`` until the context exits.
"""

from __future__ import annotations

import contextlib
import errno as _errno
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from vblock import hostio
from vblock.future import Future
from vblock.hostio import HostFile, current_io_point

SECTOR = 512

__all__ = ["FaultPlan", "FaultyHostFile", "install", "SECTOR"]


class FaultPlan:
    """What goes wrong, shared by every ``FaultyHostFile`` opened under ``install(plan)``.

    ``only`` restricts faults (and counting) to files whose real path ends with one of the given
    suffixes; other files opened under the plan behave normally but are still recorded.
    """

    def __init__(self, crash_after=None, fail=None, fail_points=None, only=None):
        self.crash_after = crash_after
        self.fail = dict(fail or {})
        self.fail_points = dict(fail_points or {})
        self.only = tuple(only) if only else None
        self.writes = 0  # write-type operations seen (counted ones)
        self.crashed = False
        self.injected = []  # (operation number, point, errno) of every injected failure
        self.files = []
        self.lock = threading.Lock()

    def applies_to(self, path):
        return self.only is None or os.path.realpath(path).endswith(self.only)

    def admit(self, counted, point):
        """Called under ``lock`` for each write-type operation: None to let it happen, or the
        errno to fail it with."""
        if self.crashed:
            return _errno.EIO
        if not counted:
            return None
        n = self.writes
        if self.crash_after is not None and n >= self.crash_after:
            self.crashed = True
            return _errno.EIO
        self.writes += 1
        err = self.fail.pop(n, None)
        if err is None and point is not None:
            err = self.fail_points.pop(point, None)
        if err is not None:
            self.injected.append((n, point, err))
        return err


class _Record:
    """One volatile write-type operation and what it replaced."""

    __slots__ = ("offset", "data", "new_size", "old_bytes", "old_size", "point")

    def __init__(self, offset, data, new_size, old_bytes, old_size, point):
        self.offset = offset  # bytes
        self.data = (
            data  # bytes written at offset (zeros for discard/zero range), or None (truncate)
        )
        self.new_size = new_size  # file length after the operation
        self.old_bytes = old_bytes  # what [offset, offset+len(data)) held before (within old size)
        self.old_size = old_size
        self.point = point


class FaultyHostFile:
    """``HostFile`` look-alike over a real file, recording volatile writes (see module docstring).

    It reports the alignment of a real O_DIRECT file (512 bytes) and checks requests against it,
    so drivers run their aligned code paths. Asynchronous operations run on a few worker threads
    and complete on them, as a real engine's completion thread would.
    """

    engine = "faulty"

    def __init__(self, path, plan, direct=True, engine="auto", read_only=False, create=False, **_):
        self.path = os.fsdecode(path)
        self.plan = plan
        self.read_only = read_only
        self._f = HostFile(
            self.path, direct=False, engine="threads", read_only=read_only, create=create, threads=2
        )
        self.direct = bool(direct)
        self.alignment = self.mem_alignment = SECTOR if self.direct else 1
        self.is_block_device = False
        self._counted = plan.applies_to(self.path)
        self.volatile = []
        self._lock = threading.Lock()  # orders operations on this file with their records
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="vblock-faulty")
        self.flushes = 0
        with plan.lock:
            plan.files.append(self)

    # -- the HostFile API -------------------------------------------------------------------------
    fd = property(lambda self: self._f.fd)
    closed = property(lambda self: self._f.closed)
    size = property(lambda self: self._f.size)

    def alloc(self, length):
        return self._f.alloc(length)

    def _check(self, buffers, offset, op):
        if self.direct:
            if offset % SECTOR or any(len(memoryview(b)) % SECTOR for b in buffers):
                raise ValueError(
                    f"{op} {self.path}: offset {offset} or a length is not a multiple of "
                    f"the O_DIRECT alignment {SECTOR}"
                )

    def pread(self, buf, offset):
        return self.preadv([buf], offset)

    def preadv(self, buffers, offset):
        self._check(buffers, offset, "read")
        if self.plan.crashed:
            raise hostio.host_error(_errno.EIO, "read", self.path, offset)
        return self._f.preadv(buffers, offset)

    def pwrite(self, buf, offset):
        return self.pwritev([buf], offset)

    def pwritev(self, buffers, offset):
        self._check(buffers, offset, "write")
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        return self._write(offset, data, "write", current_io_point())

    def flush(self):
        with self._lock:
            if self.plan.crashed:
                raise hostio.host_error(_errno.EIO, "flush", self.path)
            self._f.flush()
            self.volatile.clear()
            self.flushes += 1

    def discard(self, offset, length):
        self._fill_zeros(offset, length, "discard", current_io_point())

    def zero_range(self, offset, length, unmap=False):
        self._fill_zeros(offset, length, "zero range", current_io_point())

    def truncate(self, size):
        point = current_io_point()
        with self._lock:
            self._admit("truncate", size, point)
            old_size = self._f.size
            old = self._read_old(size, max(0, old_size - size))
            self._f.truncate(size)
            self._record(_Record(size, None, size, old, old_size, point))

    def allocate(self, offset, length):
        """As the real file's, for this simulation: the size grows (to zeros), like a truncate
        (which is how a crash replays it), and a range inside the file changes nothing."""
        if offset + length > self._f.size:
            self.truncate(offset + length)

    def seek_data(self, offset):
        return self._f.seek_data(offset)

    def seek_hole(self, offset):
        return self._f.seek_hole(offset)

    def submit_read(self, offset, buffers):
        return self._async(self.preadv, buffers, offset)

    def submit_write(self, offset, buffers):
        self._check(buffers, offset, "write")
        data = b"".join(bytes(memoryview(b).cast("B")) for b in buffers)
        return self._async(self._write, offset, data, "write", current_io_point())

    def submit_flush(self):
        return self._async(self.flush)

    def submit_discard(self, offset, length):
        return self._async(self._fill_zeros, offset, length, "discard", current_io_point())

    def submit_zero_range(self, offset, length, unmap=False):
        return self._async(self._fill_zeros, offset, length, "zero range", current_io_point())

    @contextlib.contextmanager
    def batch(self):
        yield self

    def start_writeback(self, offset=0, length=0):
        """Writes here are recorded, not cached: nothing to start."""

    def push(self):
        """Nothing is collected here: every request starts when it is submitted."""

    def inflight(self):
        return 0

    def close(self):
        self._pool.shutdown(wait=True)
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- recording --------------------------------------------------------------------------------
    def _async(self, fn, *args):
        fut = Future()

        def run():
            try:
                result = fn(*args)
            except BaseException as exc:
                fut.set_exception(exc)
            else:
                fut.set_result(result)

        self._pool.submit(run)
        return fut

    def _admit(self, op, offset, point):
        with self.plan.lock:
            err = self.plan.admit(self._counted, point)
        if err is not None:
            raise hostio.host_error(err, op, self.path, offset)

    def _read_old(self, offset, length):
        buf = bytearray(length)
        n = self._f.preadv([buf], offset) if length else 0
        return bytes(buf[:n])

    def _record(self, rec):
        self.volatile.append(rec)

    def _write(self, offset, data, op, point):
        with self._lock:
            self._admit(op, offset, point)
            old_size = self._f.size
            old = self._read_old(offset, len(data))
            n = self._f.pwritev([data], offset)
            self._record(
                _Record(offset, data, max(old_size, offset + len(data)), old, old_size, point)
            )
            return n

    def _fill_zeros(self, offset, length, op, point):
        with self._lock:
            self._admit(op, offset, point)
            old_size = self._f.size
            length = max(0, min(length, old_size - offset))  # KEEP_SIZE semantics
            old = self._read_old(offset, length)
            if length:
                self._f.pwritev([bytes(length)], offset)
            self._record(_Record(offset, bytes(length), old_size, old, old_size, point))
        return None

    # -- the crash --------------------------------------------------------------------------------
    def settle_crash(self, rng, keep_probability=0.5, tear_probability=0.5):
        """Rewrite the real file as the disk may look after the crash (see module docstring).

        Returns a list of (offset, kept sectors or None for whole, point) of the replayed writes.
        """
        with self._lock:
            for rec in reversed(self.volatile):  # back to the last durable state
                # A truncate grows back before its old bytes return; a write puts them back and
                # then drops whatever it appended.
                if rec.data is None:
                    self._f.truncate(rec.old_size)
                if rec.old_bytes:
                    self._f.pwritev([rec.old_bytes], rec.offset)
                if rec.data is not None:
                    self._f.truncate(rec.old_size)
            kept = []
            for rec in self.volatile:
                if rng.random() >= keep_probability:
                    continue
                if rec.data is None:
                    self._f.truncate(rec.new_size)
                    kept.append((rec.offset, None, rec.point))
                    continue
                sectors = range(0, len(rec.data), SECTOR)
                if len(sectors) > 1 and rng.random() < tear_probability:
                    chosen = [s for s in sectors if rng.random() < 0.5]
                else:
                    chosen = None
                for s in sectors if chosen is None else chosen:
                    self._f.pwritev([rec.data[s : s + SECTOR]], rec.offset + s)
                kept.append((rec.offset, chosen, rec.point))
            self.volatile.clear()
            return kept


@contextlib.contextmanager
def install(plan):
    """Open every host file through ``FaultyHostFile(plan)`` while the context is active."""

    def factory(path, **kwargs):
        return FaultyHostFile(path, plan, **kwargs)

    with hostio.host_file_opener(factory):
        yield plan

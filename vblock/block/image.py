"""``Image``: the one object devices, tests and the CLI use, whatever the format behind it.

An ``Image`` wraps one open driver (see ``interface.py``). It is the edge: every argument is checked
here, once (types, ranges, read-only), and then the driver is trusted with the guarantees written
in ``interface.py``. Requests that do not meet the driver's ``Limits`` are padded, bounced and split
here (``bounce.py`` explains how read-modify-write stays safe under concurrency).

The core is asynchronous: ``submit_*`` return a ``vblock.future.Future`` that may complete on any
thread. Bad arguments raise at once from ``submit_*`` (``TypeError``, ``ValueError``,
``ReadOnlyError``); failures of the I/O itself complete the future with the exception. The
synchronous methods (``read``, ``write``...) are thin wrappers that wait on those futures.

Hot path (a driver without alignment needs, or an aligned request into aligned memory): turn the
buffers into ``memoryview`` objects, check the range, hand them to the driver. Nothing is copied,
nothing is logged; on an image with alignment needs, writes also take one shared range-lock entry.
"""

from __future__ import annotations

import errno
import functools
import threading
from typing import TYPE_CHECKING, Any

from vblock.block.bounce import BufferPool, RangeLock, address_of, aligned_buffer
from vblock.block.interface import UNALLOCATED, ZERO, OpenOptions, Run
from vblock.errors import ReadOnlyError
from vblock.future import Future, completed, failed, forward, join, settle
from vblock.hostio import buffers_aligned

if TYPE_CHECKING:
    from collections.abc import Sequence

    from vblock.hostio.lock import ImageLock

__all__ = ["Image"]

_ZERO_CHUNK = 1 << 20
_zeros = None  # an aligned buffer of _ZERO_CHUNK zero bytes, made on first use; never written
_zeros_lock = threading.Lock()


def _zero_source() -> memoryview:
    global _zeros
    if _zeros is None:
        with _zeros_lock:
            if _zeros is None:
                _zeros = aligned_buffer(_ZERO_CHUNK)
    return _zeros


def _flat(view: memoryview) -> memoryview:
    if not view.c_contiguous:
        raise ValueError("buffers must be contiguous")
    return view.cast("B")


def _views(buffers, writable: bool):
    """(list of 1-D byte memoryviews, total length) for one buffer or a list/tuple of buffers.
    A list that already holds only such views is returned as it is (the hot path)."""
    if type(buffers) is list:
        total = 0
        for v in buffers:
            if type(v) is not memoryview or v.ndim != 1 or v.format != "B" or not v.c_contiguous:
                break
            if writable and v.readonly:
                raise TypeError("read buffers must be writable")
            total += len(v)
        else:
            return buffers, total
    if not isinstance(buffers, (list, tuple)):
        buffers = (buffers,)
    views = []
    total = 0
    for b in buffers:
        v = b if type(b) is memoryview else memoryview(b)
        if v.ndim != 1 or v.format != "B" or not v.c_contiguous:
            v = _flat(v)
        if writable and v.readonly:
            raise TypeError("read buffers must be writable")
        views.append(v)
        total += len(v)
    return views, total


def _aligned_views(views, a: int, m: int) -> bool:
    """Every view's length a multiple of ``a`` and its address a multiple of ``m``; requests of
    many buffers (a guest's scattered pages) are checked by one native call."""
    if len(views) > 2:
        return buffers_aligned(views, a, m)
    for v in views:
        if len(v) % a or (m > 1 and address_of(v) % m):
            return False
    return True


def _int(value, name: str) -> int:
    if type(value) is int:
        return value
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value.__index__()


def _split(views, limit: int):
    """Cut a list of views into groups of at most ``limit`` bytes each."""
    groups, cur, n = [], [], 0
    for v in views:
        while len(v):
            take = min(len(v), limit - n)
            cur.append(v[:take])
            v = v[take:]
            n += take
            if n == limit:
                groups.append(cur)
                cur, n = [], 0
    if cur:
        groups.append(cur)
    return groups


def _copy_in(buf: memoryview, pos: int, views) -> None:
    for v in views:
        n = len(v)
        buf[pos : pos + n] = v
        pos += n


def _copy_out(buf: memoryview, pos: int, views) -> None:
    for v in views:
        n = len(v)
        v[:] = buf[pos : pos + n]
        pos += n


class Image:
    """An open image: one driver instance behind the checked, asynchronous block interface.

    Attributes: ``path``, ``format`` (driver name), ``read_only``, ``options`` (``OpenOptions``),
    ``size`` (virtual bytes), ``limits`` (the driver's ``Limits``), ``driver`` (the driver instance,
    for tests and tools), ``lock`` (the ``vblock.hostio.lock.ImageLock`` held on the image file
    until ``close``, or None). Use ``vblock.open_image`` / ``vblock.create_image`` to make one.
    """

    def __init__(
        self, driver: Any, format_name: str, options: OpenOptions, lock: ImageLock | None = None
    ) -> None:
        self.driver = driver
        self.lock = lock
        self.format = format_name
        self.options = options
        self.path = driver.path
        self.read_only = bool(options.read_only or driver.read_only)
        # An image opened without its backing chain takes no data writes (metadata changes only).
        self._no_data = self.read_only or options.no_backing
        self.limits = lim = driver.limits
        self._align = lim.request_alignment
        self._mem_align = lim.mem_alignment
        self._max = lim.max_transfer
        needs = self._align > 1 or self._mem_align > 1
        self._rl = RangeLock() if needs else None
        self._pool = BufferPool(max(self._mem_align, 1)) if needs else None
        self._size = driver.size
        self._discard = options.discard != "ignore"
        self._closed = False
        self._drv_read = driver.submit_read
        self._drv_write = driver.submit_write

    # -- properties ----------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def backing(self) -> Image | None:
        """The open backing ``Image`` or None."""
        return self.driver.backing

    def __repr__(self):
        return f"<Image {self.format} {self.path!r} size={self._size}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- edge checks ----------------------------------------------------------------------------
    def _range(self, offset, length):
        if type(offset) is not int:
            offset = _int(offset, "offset")
        if type(length) is not int:
            length = _int(length, "length")
        if offset < 0 or length < 0:
            raise ValueError(f"negative offset or length ({offset}, {length})")
        if offset + length > self._size:
            raise ValueError(
                f"request [{offset}, {offset + length}) beyond the image size {self._size}"
            )
        if self._closed:
            raise ValueError("I/O on a closed image")
        return offset, length

    def _writable(self, what: str):
        if self.read_only:
            raise ReadOnlyError(f"{self.path}: {what} on an image opened read-only")

    def _data_writable(self, what: str):
        self._writable(what)
        if self._no_data:
            raise ReadOnlyError(f"{self.path}: {what} on an image opened without its backing chain")

    def _aligned(self, offset: int, views, total: int) -> bool:
        """Whether the request may go to the driver as is (only asked when the driver has limits)."""
        a = self._align
        if offset % a or total > self._max:
            return False
        return _aligned_views(views, a, self._mem_align)

    # -- asynchronous core ----------------------------------------------------------------------
    def submit_read(self, offset: int, buffers: Sequence[Any]) -> Future:
        """Read ``len(buffers)`` bytes at ``offset`` into the (writable) buffers; result: bytes read."""
        views, total = _views(buffers, True)
        if type(offset) is not int or offset < 0 or offset + total > self._size or self._closed:
            offset, _ = self._range(offset, total)  # raises, or converts an int-like offset
        if not total:
            return completed(0)
        if self._rl is None:
            if total <= self._max:
                return self._drv_read(offset, views)
            return join([self._drv_read(o, g) for o, g in self._groups(offset, views)])
        a = self._align
        if not offset % a and total <= self._max:
            m = self._mem_align
            if len(views) == 1:  # _aligned_views, inlined (hot path)
                v = views[0]
                aligned = not (len(v) % a or (m > 1 and address_of(v) % m))
            else:
                aligned = _aligned_views(views, a, m)
            if aligned:
                return self._drv_read(offset, views)
        return self._bounce_read(offset, views, total)

    def submit_write(self, offset: int, buffers: Sequence[Any], fua: bool = False) -> Future:
        """Write the buffers' bytes at ``offset``; result: bytes written. ``fua``: durable on completion."""
        if self._no_data:
            self._data_writable("write")
        views, total = _views(buffers, False)
        if type(offset) is not int or offset < 0 or offset + total > self._size or self._closed:
            offset, _ = self._range(offset, total)  # raises, or converts an int-like offset
        if not total:
            return completed(0)
        rl = self._rl
        if rl is None or total > self._max:
            return self._write(offset, views, total, fua)
        # the aligned write into aligned memory, as in _write, inlined (hot path)
        a = self._align
        if not offset % a:
            m = self._mem_align
            if len(views) == 1:  # _aligned_views, inlined (hot path)
                v = views[0]
                aligned = not (len(v) % a or (m > 1 and address_of(v) % m))
            else:
                aligned = _aligned_views(views, a, m)
            if aligned:
                slot = rl.begin_plain(offset, offset + total)
                if slot is not None:
                    try:
                        fut = self._drv_write(offset, views, fua)
                    except BaseException:
                        rl.plain_failed(slot)
                        raise
                    slot[2] = fut  # RangeLock.plain_submitted, inlined
                    if slot[3]:
                        rl.plain_submitted(slot, fut)
                    return fut
        return self._bounce_write(offset, views, total, fua)

    def _write(self, offset, views, total, fua):
        """The write path after the edge checks (also used by the generic zero fill)."""
        rl = self._rl
        if rl is None:
            if total <= self._max:
                return self._drv_write(offset, views, fua)
            return join([self._drv_write(o, g, fua) for o, g in self._groups(offset, views)])
        if self._aligned(offset, views, total):
            slot = rl.begin_plain(offset, offset + total)
            if slot is not None:
                try:
                    fut = self._drv_write(offset, views, fua)
                except BaseException:
                    rl.plain_failed(slot)
                    raise
                rl.plain_submitted(slot, fut)
                return fut
        return self._bounce_write(offset, views, total, fua)

    def batch(self) -> Any:
        """A context manager: requests this thread submits inside it reach the host together when
        it exits (one system call for many). Do not wait for any of them inside it."""
        return self.driver.batch()

    def submit_flush(self) -> Future:
        if self._closed:
            raise ValueError("I/O on a closed image")
        return self.driver.submit_flush()

    def submit_discard(self, offset: int, length: int) -> Future:
        """Tell the driver the range is unused (advisory; dropped when opened with discard="ignore")."""
        self._data_writable("discard")
        offset, length = self._range(offset, length)
        if not length or not self._discard:
            return completed(None)
        # a driver returning None from discard means "nothing to do"
        return self._locked(
            offset,
            offset + length,
            lambda: self.driver.submit_discard(offset, length) or completed(None),
        )

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> Future:
        """Make the range read as zeros; ``may_unmap`` lets the driver deallocate it."""
        self._data_writable("write_zeroes")
        offset, length = self._range(offset, length)
        if not length:
            return completed(None)
        may_unmap = bool(may_unmap) and self._discard
        fut = self._locked(
            offset,
            offset + length,
            lambda: self.driver.submit_write_zeroes(offset, length, may_unmap),
        )
        if fut is None:
            return self._zero_fill(offset, length)

        def fallback(f):
            exc = f.exception()
            if exc is None:
                return None
            if isinstance(exc, OSError) and exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                return self._zero_fill(offset, length)
            raise exc

        return settle(fut, fallback)

    # -- slow paths -----------------------------------------------------------------------------
    def _groups(self, offset, views):
        out = []
        for group in _split(views, self._max):
            out.append((offset, group))
            offset += sum(len(v) for v in group)
        return out

    def _span(self, offset, end):
        a = self._align
        return offset - offset % a, -(-end // a) * a

    def _submit_span(self, fn, a0, buf, *args):
        """Submit one aligned pooled buffer, split at ``max_transfer``."""
        if len(buf) <= self._max:
            return fn(a0, [buf], *args)
        step = self._max - self._max % max(self._align, 1)
        return join([fn(a0 + p, [buf[p : p + step]], *args) for p in range(0, len(buf), step)])

    def _locked(self, start, end, start_io):
        """Run ``start_io()`` (which returns a driver future, or None) while holding a shared
        range-lock entry over the aligned blocks of [start, end), on images that have one.
        Returns the future, or None when ``start_io`` returned None."""
        rl = self._rl
        if rl is None:
            return start_io()
        a0, a1 = self._span(start, end)
        token = rl.try_shared(a0, a1)
        if token is not None:
            try:
                fut = start_io()
            except BaseException:
                rl.release(token)
                raise
            if fut is None:
                rl.release(token)
                return None
            fut.add_done_callback(functools.partial(rl.release, token))
            return fut
        out = Future()

        def run(token):
            try:
                fut = start_io()
            except BaseException as exc:
                rl.release(token)
                out.set_exception(exc)
                return
            if fut is None:
                rl.release(token)  # the driver asks for the generic fallback
                out.set_exception(
                    OSError(errno.EOPNOTSUPP, "driver asked for the generic fallback")
                )
                return
            fut.add_done_callback(functools.partial(rl.release, token))
            fut.add_done_callback(lambda f: forward(f, out))

        token = rl.acquire(a0, a1, False, run)
        if token is not None:
            run(token)
        return out

    def _zero_fill(self, offset, length):
        """write_zeroes done generically: write zero buffers through the normal write path."""
        zeros = _zero_source()
        per_request = max(self._align, min(self._max, 64 * _ZERO_CHUNK))
        per_request -= per_request % self._align
        futs = []
        end = offset + length
        pos = offset
        while pos < end:
            n = min(per_request, end - pos)
            views = [zeros] * (n // _ZERO_CHUNK)
            if n % _ZERO_CHUNK:
                views.append(zeros[: n % _ZERO_CHUNK])
            futs.append(self._write(pos, views, n, False))
            pos += n
        return settle(join(futs), _none)

    def _bounce_read(self, offset, views, total):
        views = list(views)  # kept until completion: the caller's list may be reused
        rl = self._rl
        pool = self._pool
        a0, a1 = self._span(offset, offset + total)
        out = Future()

        def run(token):
            try:
                buf = pool.get(a1 - a0)
                fut = self._submit_span(self._drv_read, a0, buf)
            except BaseException as exc:
                rl.release(token)
                out.set_exception(exc)
                return

            def done(f):
                exc = f.exception()
                if exc is None:
                    try:
                        _copy_out(buf, offset - a0, views)
                    except BaseException as e:  # a caller buffer resized under us
                        exc = e
                rl.release(token)
                pool.put(buf)
                if exc is None:
                    out.set_result(total)
                else:
                    out.set_exception(exc)

            fut.add_done_callback(done)

        token = rl.acquire(a0, a1, False, run)
        if token is not None:
            run(token)
        return out

    def _bounce_write(self, offset, views, total, fua):
        views = list(views)  # kept until the copy: the caller's list may be reused
        rl = self._rl
        pool = self._pool
        a = self._align
        end = offset + total
        a0, a1 = self._span(offset, end)
        rmw = a0 != offset or a1 != end
        out = Future()

        def finish(token, buf, f):
            rl.release(token)
            if buf is not None:
                pool.put(buf)
            exc = f.exception()
            if exc is None:
                out.set_result(total)
            else:
                out.set_exception(exc)

        def run(token):
            buf = None
            try:
                if not rmw and total <= self._max and self._aligned(offset, views, total):
                    # aligned after all: only the fast path's lock attempt failed
                    fut = self._drv_write(offset, views, fua)
                    fut.add_done_callback(functools.partial(finish, token, None))
                    return
                buf = pool.get(a1 - a0)

                def write_back(f=None):
                    if f is not None and f.exception() is not None:
                        finish(token, buf, f)
                        return
                    try:
                        _copy_in(buf, offset - a0, views)
                        fut = self._submit_span(self._drv_write, a0, buf, fua)
                    except BaseException as exc:
                        finish(token, buf, failed(exc))
                        return
                    fut.add_done_callback(functools.partial(finish, token, buf))

                if not rmw:
                    write_back()
                    return
                reads = []
                if offset != a0:
                    reads.append(self._drv_read(a0, [buf[:a]]))
                if end != a1 and not (a1 - a == a0 and offset != a0):
                    reads.append(self._drv_read(a1 - a, [buf[a1 - a - a0 :]]))
                join(reads).add_done_callback(write_back)
            except BaseException as exc:
                finish(token, buf, failed(exc))

        token = rl.acquire(a0, a1, rmw, run)
        if token is not None:
            run(token)
        return out

    # -- synchronous wrappers -------------------------------------------------------------------
    def read(self, offset: int, length: int) -> bytes:
        length = _int(length, "length")
        if length < 0:
            raise ValueError(f"negative length {length}")
        pool = self._pool
        a = self._align
        if (
            pool is not None
            and length
            and type(offset) is int
            and not offset % a
            and not length % a
            and length <= self._max
        ):
            buf = pool.get(length)  # aligned: read straight into it, no bounce copy, no range lock
            try:
                self.submit_read(offset, buf).result()
                return bytes(buf)
            finally:
                pool.put(buf)
        buf = bytearray(length)
        self.submit_read(offset, memoryview(buf)).result()
        return bytes(buf)

    def readinto(self, offset: int, buffer: Any) -> int:
        return self.submit_read(offset, buffer).result()

    def write(self, offset: int, data: Any, fua: bool = False) -> None:
        self.submit_write(offset, data, fua).result()

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = False) -> None:
        self.submit_write_zeroes(offset, length, may_unmap).result()

    def discard(self, offset: int, length: int) -> None:
        self.submit_discard(offset, length).result()

    def flush(self) -> None:
        self.submit_flush().result()

    def start_writeback(self) -> None:
        """Start writing this image's data cached by the host to the device, without waiting for
        it: the next flush has less left to do (see ``BlockDriver.start_writeback``)."""
        if self._closed:
            raise ValueError("I/O on a closed image")
        if not self.read_only:
            self.driver.start_writeback()

    # -- metadata -------------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list:
        """Runs covering [offset, offset+length): this image's DATA and ZERO runs, with
        UNALLOCATED ones resolved through the backing chain (``depth`` counts the hops);
        what no layer allocates reads as zeros and is reported as ZERO."""
        offset, length = self._range(offset, length)
        if not length:
            return []
        runs = self.driver.block_status(offset, length)
        backing = self.driver.backing
        out = []
        for run in runs:
            if run.kind != UNALLOCATED:
                out.append(run)
                continue
            if backing is None:
                out.append(Run(run.offset, run.length, ZERO, None, run.depth))
                continue
            inside = max(0, min(run.offset + run.length, backing.size) - run.offset)
            if inside:
                for r in backing.block_status(run.offset, inside):
                    out.append(r._replace(depth=r.depth + 1))
            if inside < run.length:
                out.append(Run(run.offset + inside, run.length - inside, ZERO, None, run.depth))
        return out

    def resize(self, size: int) -> None:
        """Grow or shrink the virtual disk to ``size`` bytes (a multiple of the request alignment)."""
        self._writable("resize")
        size = _int(size, "size")
        if size < 0:
            raise ValueError(f"negative size {size}")
        if size % self._align:
            raise ValueError(f"size {size} is not a multiple of the alignment {self._align}")
        if self._closed:
            raise ValueError("resize of a closed image")
        self.driver.truncate(size)
        self._size = self.driver.size

    def check(self, repair: bool = False) -> dict:
        if repair:
            self._writable("repair")
        return self.driver.check(repair)

    def info(self) -> dict:
        """qemu-img info style fields (``filename``, ``format``, ``virtual-size``, ``read-only``...)
        plus whatever the driver adds (``actual-size``, ``cache``, ``discard``...)."""
        d = {
            "filename": self.path,
            "format": self.format,
            "virtual-size": self._size,
            "read-only": self.read_only,
            "cache": self.options.cache,
            "request-alignment": self._align,
            "mem-alignment": self._mem_align,
        }
        d.update(self.driver.info())
        if not self._discard:
            d["discard"] = "ignore"
        return d

    def change_backing(self, name: str | None, fmt: str | None = None) -> None:
        self._writable("change_backing")
        self.driver.change_backing(name, fmt)

    def close(self) -> None:
        """Finish in-flight requests, flush, release the driver, then drop the image locks.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.driver.close()
        finally:
            if self.lock is not None:
                self.lock.close()


def _none(f: Future) -> None:
    f.result()  # re-raises a failure
    return None

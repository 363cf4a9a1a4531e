"""The request path of a virtio-blk device: queue turns, request submission, completion and
delivery. ``VirtioBlk`` (``vblock.virtio.blk``) is a :class:`BlkDataPath`; this module holds the
per-request code, that module the device's control side (status, features, queue setup, config
space, reset).

A notification puts its queue on the device's work list and, if no other thread is draining, drains
the list (split rings: ``SplitQueue``; packed rings, when VIRTIO_F_RING_PACKED is negotiated:
``PackedQueue``, swapped in at FEATURES_OK): each queue gets a turn of at most ``queue size``
chains (bounded work, so a busy queue cannot starve another: a queue with more work goes to the
back of the list), with notifications disabled during the turn and re-enabled, then re-checked, at
its end. Every chain is walked and validated (``chain.walk``), parsed (``blk_request.parse``; on
split rings both through ``blk_request.frame_reader``, which serves standard reads and writes
natively) and submitted to the image without waiting: requests complete in any order on whatever
thread the backend completes them. Completions are queued per virtqueue and published in batches:
the used index is written once per batch and the interrupt raised once per batch, subject to
EVENT_IDX (2.7.7.2). Completions that arrive while the queue is being drained (including those the
backend finishes inline) are published at the end of the turn.

Guest mistakes never raise out of the device: a broken chain or frame without a status byte
returns its head with used length 0; a bad request is answered in its status byte, and so is a
chain with a buffer outside guest memory whose status byte is inside (IOERR, no data moved,
``chain.walk``); a broken ring
(avail index far ahead, head out of range or already in flight) sets DEVICE_NEEDS_RESET and, with
DRIVER_OK, sends a config-change interrupt (2.1.2).

Delivery. With ``deliver="callback"`` (the default) completions are published, and the used-buffer
interrupt raised, on whatever thread completes them (a backend's completion or pool thread, or the
kicking thread for requests that finish at once). With ``deliver="poll"`` requests still go to the
image when the guest kicks, but nothing is published by itself: completions wait until the
emulator calls :meth:`~BlkDataPath.poll` on its own thread, which publishes them (used entries, then
the interrupt) there; :meth:`~BlkDataPath.fileno` is an eventfd that is readable while completions
wait. Config-change interrupts (a resize, a broken ring) are raised at once in both modes.

Threads. :meth:`~BlkDataPath.notify` runs on any thread (the vCPU that kicked); one thread at a
time drains (``_drain_lock``; the others leave their queue on the work list for it).
:meth:`~BlkDataPath.complete` runs on any thread (the backend's). A queue's used side - used
entries, the used index, the interrupt decision and the counters - changes only under that
queue's ``DeviceQueue.lock``. Counting (``blk_stats``) is done inline here: one clock read per
queue turn and one per published batch.

Ownership. ``BlkDataPath`` sets up its own state in :meth:`~BlkDataPath._init_datapath` (the
delivery mode, the poll eventfd, the drain lock and work list); the rest it reads from the device
as ``VirtioBlk`` keeps it: ``image``, ``mem``, ``queue_size_max``, ``_queues`` (one
:class:`DeviceQueue` each, replaced at reset), ``_status``, ``_rules``, ``_indirect``,
``_writeback``, ``_counting``, ``_host_batch`` and ``_used_irq``, and it calls
``_set_needs_reset(reason)`` and ``update_capacity()``. The code is a base class, not a helper
object, so the per-request path reads the device's attributes directly, with no extra hop.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
import weakref

from vblock.errors import GuestError
from vblock.future import defer
from vblock.virtio.blk_request import BlkRequest, finish, parse
from vblock.virtio.chain import ChainError, RingError
from vblock.virtio.queue import SplitQueue
from vblock.virtio.spec import (
    DEVICE_NEEDS_RESET,
    DRIVER_OK,
    FAILED,
    SECTOR_SHIFT,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    le16,
)

__all__ = ["BlkDataPath", "DeviceQueue", "DeviceRequest"]

_log = logging.getLogger("vblock.virtio.blk")  # the device's logger, as before the split
_unpack16 = le16.unpack_from
_now = time.perf_counter_ns


class DeviceRequest(BlkRequest):
    """A request slot that knows its device, so a backend future can call straight back.
    ``started``: the clock (ns) of the queue turn that picked it up."""

    __slots__ = ("device", "started")

    def __init__(self, head, owner, device):
        super().__init__(head, owner)
        self.device = device
        self.started = 0

    def backend_done(self, fut):
        self.device.complete(self, fut.exception())


class DeviceQueue:
    """Per-virtqueue device state: the ring, one request slot per head, and the completion batch."""

    __slots__ = (
        "index",
        "ring",
        "read",
        "slots",
        "done",
        "lock",
        "draining",
        "queued",
        "dead",
        "popped",
        "published",
        "idle",
        "counters",
        "other",
        "turn",
    )

    def __init__(self, index, size_max, counters):
        self.index = index
        self.popped = 0  # heads taken from the avail ring (drainer only)
        self.published = 0  # used entries published (under ``lock``)
        self.idle = None  # an Event while someone waits for this queue to go idle
        self.ring = SplitQueue(size_max)
        self.read = None  # split rings: blk_request.frame_reader over the ring's table, made when it is enabled
        self.slots = ()
        self.done = (
            collections.deque()
        )  # (head, used_len, ring descriptors) waiting to be published
        self.lock = threading.Lock()  # the used side: add_used / publish / notification decision
        self.draining = False
        self.queued = False
        self.dead = False
        self.counters, self.other = counters  # kept across resets (see blk_stats.new_counters)
        self.turn = 0  # the clock at the start of the current turn (ns)


class BlkDataPath:
    """The per-request half of ``VirtioBlk``: see the module docstring for what it owns and what
    it reads from the device."""

    def _init_datapath(self, deliver: str) -> None:
        """Set up the request path's own state (once, from ``VirtioBlk.__init__``)."""
        self.deliver = deliver
        self._poll_fd = None
        self._poll_signalled = False  # poll mode: the eventfd holds a count (see poll)
        self._poll_lock = threading.Lock()
        if deliver == "poll":
            self._poll_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._closer = weakref.finalize(self, os.close, self._poll_fd)
        self._drain_lock = threading.Lock()
        self._drain_owner = None
        self._work = collections.deque()

    # -- queue turns ------------------------------------------------------------------------------
    def notify(self, index: int) -> None:
        """An available-buffer notification for queue ``index`` (any thread)."""
        if self._status & (DRIVER_OK | DEVICE_NEEDS_RESET | FAILED) != DRIVER_OK:
            return  # 2.1.2: no buffers are used before DRIVER_OK, nor after a fatal error
        queues = self._queues
        if not 0 <= index < len(queues):
            return
        dq = queues[index]
        if not dq.ring.ready:
            return
        if not dq.queued:
            dq.queued = True
            self._work.append(dq)
        self._run()

    def _run(self):
        work = self._work
        lock = self._drain_lock
        while work:
            if not lock.acquire(False):
                return  # the thread holding it drains our queue too, and re-checks before leaving
            self._drain_owner = threading.get_ident()
            try:
                while work:
                    dq = work.popleft()
                    dq.queued = False
                    if self._service(dq) and not dq.queued:
                        dq.queued = True
                        work.append(dq)  # bounded turn used up: back of the line
            finally:
                self._drain_owner = None
                lock.release()

    def _service(self, dq):
        """One bounded turn on ``dq``: walk, parse and submit up to ``queue size`` chains. Returns
        True if the queue may have more work."""
        q = dq.ring
        if dq.dead or not q.ready or self._status & (DEVICE_NEEDS_RESET | FAILED):
            return False
        if self.image.size >> SECTOR_SHIFT != self._rules.capacity_sectors:
            self.update_capacity()  # the image was resized under us: follow it (5.2.4)
        dq.draining = True
        if self._counting:
            dq.turn = _now()
        try:
            q.disable_notification()
            with self._host_batch():
                if q.packed:
                    return self._drain_packed(dq, q)
                return self._drain_split(dq, q)
        except RingError as exc:
            self._set_needs_reset(str(exc))
            return False
        finally:
            dq.draining = False
            if dq.done:
                if self._poll_fd is None:
                    self._flush(dq)
                else:
                    self._completions_wait()

    def _drain_split(self, dq, q):
        budget = size = q.size
        mask = size - 1
        avail = q.avail
        read = dq.read
        start = self._start
        while True:
            n = q.available()
            if n > budget:
                n = budget
            i = q.next_avail
            for _ in range(n):
                head = _unpack16(avail, 4 + 2 * (i & mask))[0]
                i = (i + 1) & 0xFFFF
                q.next_avail = i
                dq.popped += 1
                try:
                    if head >= size:
                        raise RingError(
                            f"head index {head} >= queue size {size}"
                        )  # 2.7.6 ring[] names a head
                    start(dq, head, read, 1)
                except RingError:
                    dq.popped -= 1  # refused (device needs reset): never coming back
                    raise
                if dq.dead:
                    return False  # reset by an interrupt handler meanwhile
            budget -= n
            if budget == 0:
                return True
            if not q.enable_notification():
                return False

    def _drain_packed(self, dq, q):
        budget = q.size
        mem, indirect, indirect_max = self.mem, self._indirect, self.queue_size_max
        start = self._start
        rules = self._rules
        while True:
            while budget and q.available():
                budget -= 1
                dq.popped += 1
                try:
                    try:
                        bid, ndesc, chain = q.walk(mem, indirect, indirect_max)
                    except ChainError as exc:
                        _log.debug("virtio-blk: queue %d at %d: %s", dq.index, q.next_avail, exc)
                        bid, ndesc, chain = exc.buffer_id, exc.ring_descs, None
                        if bid >= q.size:
                            raise RingError(f"buffer id {bid} >= queue size {q.size}") from None
                    q.advance(ndesc)
                    start(
                        dq,
                        bid,
                        None if chain is None else functools.partial(_parse_into, chain, rules),
                        ndesc,
                    )
                except RingError:
                    dq.popped -= 1  # refused (device needs reset): never coming back
                    raise
                if dq.dead:
                    return False
            if budget == 0:
                return True
            if not q.enable_notification():
                return False

    def _start(self, dq, head, read, ndesc):
        """Start the request of ``head`` (split: descriptor index below the queue size; packed:
        buffer ID, whose chain took ``ndesc`` ring descriptors). ``read(req)`` fills the request
        from its chain (``ChainError``: no status byte to answer in; ``GuestError``: answer with
        its status); ``read`` None means the chain could not even be walked."""
        req = dq.slots[head]
        if req.busy:
            raise RingError(f"head {head} made available again while in flight")
        req.ndesc = ndesc
        req.started = dq.turn
        if read is None:
            self._returned(dq, head, ndesc)  # an unparseable frame still returns its head
            return
        req.type = -1  # until parsed: a frame refused before its header counts as unsupported
        try:
            read(req)
        except RingError:
            raise  # the ring itself is broken: the caller sets DEVICE_NEEDS_RESET
        except ChainError as exc:
            _log.debug("virtio-blk: queue %d head %d: %s", dq.index, head, exc)
            self._returned(dq, head, ndesc)
            return
        except GuestError as exc:
            req.busy = True
            self.complete(req, exc)
            return
        req.busy = True
        self._submit(req)

    def _submit(self, req):
        t = req.type
        try:
            if t == VIRTIO_BLK_T_IN:
                fut = self.image.submit_read(req.offset, req.data)
            elif t == VIRTIO_BLK_T_OUT:
                fut = self.image.submit_write(req.offset, req.data, not self._writeback)
            elif t == VIRTIO_BLK_T_FLUSH:
                fut = self.image.submit_flush()
            elif t == VIRTIO_BLK_T_GET_ID:
                _scatter(req.data, self._rules.serial)
                self.complete(req, None)
                return
            else:
                self._next_segment(req, 0)
                return
        except Exception as exc:  # the backend refused at submit: answer IOERR, never raise
            _log.debug("virtio-blk: submit failed: %r", exc)
            self.complete(req, exc)
            return
        fut.add_done_callback(req.backend_done)

    def _next_segment(self, req, i):
        """DISCARD / WRITE_ZEROES segments run one after another; the first failure ends it."""
        segs = req.segments
        while i < len(segs):
            offset, length, unmap = segs[i]
            i += 1
            if req.type == VIRTIO_BLK_T_WRITE_ZEROES:
                fut = self.image.submit_write_zeroes(offset, length, unmap)
            else:
                fut = self.image.submit_discard(offset, length)
            if not fut.done():
                fut.add_done_callback(lambda f, i=i: self._segment_done(req, f, i))
                return
            exc = fut.exception()
            if exc is not None:
                self.complete(req, exc)
                return
        self.complete(req, None)

    def _segment_done(self, req, fut, i):
        exc = fut.exception()
        if exc is not None:
            self.complete(req, exc)
            return
        try:
            self._next_segment(req, i)
        except Exception as exc:
            self.complete(req, exc)

    def _returned(self, dq, head, ndesc):
        """Queue the used entry of a chain that had no status byte to answer in (used len 0)."""
        if self._counting:
            dq.done.append((head, 0, ndesc, -1, 0, True, dq.turn))
        else:
            dq.done.append((head, 0, ndesc))

    def complete(self, req: BlkRequest, outcome: BaseException | None) -> None:
        """Finish ``req`` with ``outcome`` (None or an exception) from any thread."""
        dq = req.owner
        if dq.dead:  # reset since: drop (no status byte, no used entry)
            req.busy = False
            return
        used = finish(req, outcome)
        if self._counting:
            t = req.type
            if outcome is not None:
                nbytes = 0  # refused or failed: count no data as moved
            elif t == VIRTIO_BLK_T_IN or t == VIRTIO_BLK_T_OUT:
                nbytes = req.length
            elif req.segments:
                nbytes = sum(seg[1] for seg in req.segments)
            else:
                nbytes = 0
            entry = (req.head, used, req.ndesc, t, nbytes, outcome is not None, req.started)
        else:
            entry = (req.head, used, req.ndesc)
        req.data = req.segments = None
        req.busy = False
        dq.done.append(entry)
        if self._poll_fd is not None:
            if not self._poll_signalled:
                # Once per batch of backend completions, after the last: the poller wakes to a
                # whole batch, and not while this thread still holds the GIL running callbacks.
                defer(_signal_poll, self)
        elif not dq.draining:
            # Once per batch of backend completions: one used-index store, one interrupt.
            defer(self._flush, dq)

    def _completions_wait(self):
        """Poll mode: make the eventfd readable (once until the next ``poll``)."""
        with self._poll_lock:
            if self._poll_signalled or not self._closer.alive:  # signalled, or closed
                return
            os.eventfd_write(self._poll_fd, 1)
            self._poll_signalled = True

    def _flush(self, dq):
        """Publish every queued completion of ``dq``: one used-index store, at most one interrupt.
        Whoever holds the queue's lock publishes for everyone; a thread that finds it taken
        leaves its entry in ``done`` for the holder, which re-checks after releasing.
        Returns the number of used entries this call published."""
        done = dq.done
        q = dq.ring
        lock = dq.lock
        total = 0
        while done:
            if not lock.acquire(False):
                return total
            try:
                if dq.dead:
                    done.clear()
                    return total
                add_used = q.add_used
                pop = done.popleft
                n = 0
                if self._counting:
                    now = _now()
                    counters, other = dq.counters, dq.other
                    while done:
                        head, used, ndesc, t, nbytes, err, started = pop()
                        add_used(head, used, ndesc)
                        n += 1
                        c = counters.get(t, other)
                        c.ops += 1
                        c.bytes += nbytes
                        if err:
                            c.errors += 1
                        lat = (now - started) | 8  # at least 8 ns: the bucket formula needs 4 bits
                        if lat > c.max_ns:
                            c.max_ns = lat
                        b = lat.bit_length()
                        c.hist[b << 2 | (lat >> (b - 3)) & 3] += 1
                else:
                    while done:
                        add_used(*pop())
                        n += 1
                q.publish_used()
                irq = q.needs_notification() and not self._status & FAILED
                dq.published += n
                total += n
                if dq.idle is not None and dq.published == dq.popped:
                    dq.idle.set()
            finally:
                lock.release()
            if irq:
                self._used_irq(dq.index)
        return total

    # -- quiescing ------------------------------------------------------------------------------
    def wait_idle(self, index: int | None = None, timeout: float | None = None) -> bool:
        """Wait until queue ``index`` (default: every queue) has every head it took from the
        avail ring back on the used ring. Returns False on timeout. Call it from a thread that
        is not the one completing requests."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for dq in self._queues if index is None else [self._queues[index]]:
            with dq.lock:
                if dq.published == dq.popped or dq.dead:
                    continue
                dq.idle = event = threading.Event()
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not event.wait(left):
                    return False
            finally:
                dq.idle = None
        return True

    # -- poll delivery ---------------------------------------------------------------------------
    def poll(self) -> int:
        """Publish what has completed (used ring entries, then the interrupt, per queue) on the
        calling thread, and empty the eventfd; returns the number of used entries published.
        With ``deliver="callback"`` completions publish themselves and this returns 0."""
        if self._poll_fd is None:
            return 0
        # The flag is true exactly while the eventfd holds a count (both change under the lock).
        # Empty it before publishing: a completion queued before is published below, one queued
        # after signals again.
        if self._poll_signalled:
            with self._poll_lock:
                if self._poll_signalled:
                    os.eventfd_read(self._poll_fd)
                    self._poll_signalled = False
        total = 0
        for dq in self._queues:
            if dq.done:
                total += self._flush(dq)
        return total

    def fileno(self) -> int:
        """Poll mode: an eventfd that is readable while completions wait for :meth:`poll` (for
        the emulator's event loop; :meth:`poll` empties it). ``ValueError`` in callback mode."""
        if self._poll_fd is None:
            raise ValueError("fileno() needs VirtioBlk(..., deliver='poll')")
        return self._poll_fd

    def close(self) -> None:
        """Release the poll-mode eventfd (also released when the device is garbage collected)."""
        if self._poll_fd is not None:
            with self._poll_lock:  # no completion writes to the number once it is closed
                self._closer()
                self._poll_signalled = False

    # -- introspection ---------------------------------------------------------------------------
    def in_flight(self) -> int:
        """Requests submitted to the backend and not yet completed, over all queues."""
        return sum(r.busy for dq in self._queues for r in dq.slots)


def _signal_poll(dev):
    dev._completions_wait()


def _parse_into(chain, rules, req):
    """``read(req)`` for a chain the packed ring walked already."""
    parse(req, chain, rules)


def _scatter(views, data):
    """Copy ``data`` into the start of ``views``."""
    pos = 0
    for v in views:
        n = min(len(v), len(data) - pos)
        if n <= 0:
            break
        v[:n] = data[pos : pos + n]
        pos += n

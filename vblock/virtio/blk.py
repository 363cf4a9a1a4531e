"""VirtioBlk: the virtio-blk device model (virtio 1.2, 5.2), transport-independent.

Theory of operation
-------------------
A transport (``VirtioMmio``, later vhost-user) feeds the device four kinds of events: feature
words, status writes, queue configuration, and queue notifications; the device answers with two
kinds of interrupts, used-buffer (per queue) and config-change, through hooks the transport
installs with :meth:`VirtioBlk.attach`.

Status is a state machine over the driver-owned bits (``_STATUS_STEPS``, 3.1.1): 0 -> ACKNOWLEDGE
-> +DRIVER -> +FEATURES_OK -> +DRIVER_OK, each step adding one bit; FAILED may be set at any time;
DEVICE_NEEDS_RESET is device-owned; writing 0 resets. FEATURES_OK is refused (left clear, 3.1.1
step 6) unless the driver's features are a subset of the device's and include VERSION_1.
No buffer is consumed and no used-buffer interrupt is sent before DRIVER_OK (2.1.2).

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

Reset drops everything safely: queues in flight are retired (their late completions touch neither
rings nor status bytes) and fresh queue state takes their place. Data a backend has already been
asked to move still lands in guest memory, as DMA in flight would.

Delivery. With ``deliver="callback"`` (the default) completions are published, and the used-buffer
interrupt raised, on whatever thread completes them (a backend's completion or pool thread, or the
kicking thread for requests that finish at once). With ``deliver="poll"`` requests still go to the
image when the guest kicks, but nothing is published by itself: completions wait until the
emulator calls :meth:`VirtioBlk.poll` on its own thread, which publishes them (used entries, then
the interrupt) there; :meth:`VirtioBlk.fileno` is an eventfd that is readable while completions
wait. Config-change interrupts (a resize, a broken ring) are raised at once in both modes.

Counters. Every published request is counted by type (:meth:`VirtioBlk.stats`): one clock read per
queue turn (when the device picks requests up) and one per published batch, and a few additions
per request under the lock that publishes it, so counts are exact. Latency runs from the turn that
picked a request up to the batch that published it, so it includes, in poll mode, the wait for
``poll()``. Counts live for the device's life and survive resets.

Snapshots. :meth:`VirtioBlk.save_state` captures the negotiated state and every queue's ring
addresses and indices as plain values; ``VirtioBlk(..., state=saved)`` continues from it over the
same guest memory (the rings themselves live there).
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vblock.errors import GuestError
from vblock.future import defer
from vblock.virtio.blk_request import BlkRequest, RequestRules, finish, frame_reader, parse
from vblock.virtio.chain import ChainError, RingError
from vblock.virtio.memory import GuestMemory
from vblock.virtio.packed import PackedQueue
from vblock.virtio.queue import SplitQueue
from vblock.virtio.spec import (
    ACKNOWLEDGE,
    DEVICE_NEEDS_RESET,
    DRIVER,
    DRIVER_OK,
    FAILED,
    FEATURES_OK,
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_BLK_F_DISCARD,
    VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX,
    VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
    VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    le16,
    virtio_blk_config,
)

if TYPE_CHECKING:
    from vblock.block import Image

__all__ = ["VirtioBlk", "StatusError"]

_log = logging.getLogger(__name__)
_unpack16 = le16.unpack_from
_now = time.perf_counter_ns

DELIVERY_MODES = ("callback", "poll")

# stats() keys, by request type; anything else counts as "unsupported".
_KINDS = {
    VIRTIO_BLK_T_IN: "read",
    VIRTIO_BLK_T_OUT: "write",
    VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_DISCARD: "discard",
    VIRTIO_BLK_T_WRITE_ZEROES: "write_zeroes",
    VIRTIO_BLK_T_GET_ID: "get_id",
}
STATS_KEYS = (*_KINDS.values(), "unsupported")
_SAVED_STATE_VERSION = 1

# Driver-owned status bits: current value -> the one value the next step may write (3.1.1).
_STATUS_STEPS = {
    0: ACKNOWLEDGE,
    ACKNOWLEDGE: ACKNOWLEDGE | DRIVER,
    ACKNOWLEDGE | DRIVER: ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ACKNOWLEDGE | DRIVER | FEATURES_OK: ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
}

SIZE_MAX_BYTES = 1 << 20  # config size_max: largest single segment we advertise
MAX_DISCARD_SECTORS = 0x3FFFFF  # per segment, as QEMU's default (2 GiB - 512)
MAX_SEGMENTS = 32  # DISCARD / WRITE_ZEROES segments per request
PHYSICAL_BLOCK_BYTES = 4096  # topology hint: what O_DIRECT hosts align to


class StatusError(GuestError):
    """The driver wrote a device status that no step of 3.1.1 allows (names state and value).
    Transports log it and leave the status unchanged."""


class _Request(BlkRequest):
    """A request slot that knows its device, so a backend future can call straight back.
    ``started``: the clock (ns) of the queue turn that picked it up."""

    __slots__ = ("device", "started")

    def __init__(self, head, owner, device):
        super().__init__(head, owner)
        self.device = device
        self.started = 0

    def backend_done(self, fut):
        self.device.complete(self, fut.exception())


class _Counter:
    """One request type's counts on one queue. Latencies go into a log-linear histogram: four
    buckets per power of two of nanoseconds, so a percentile is exact to within a quarter of an
    octave; ``max_ns`` is exact. Updated only under the queue's used-side lock."""

    __slots__ = ("ops", "bytes", "errors", "max_ns", "hist")

    def __init__(self):
        self.ops = self.bytes = self.errors = self.max_ns = 0
        self.hist = [0] * 256

    def add(self, other):
        self.ops += other.ops
        self.bytes += other.bytes
        self.errors += other.errors
        self.max_ns = max(self.max_ns, other.max_ns)
        self.hist = [a + b for a, b in zip(self.hist, other.hist)]

    def _percentile_us(self, fraction):
        rank = -(-self.ops * fraction // 1) or 1
        seen = 0
        for idx, n in enumerate(self.hist):
            seen += n
            if n and seen >= rank:
                b, q = idx >> 2, idx & 3
                return round(min((5 + q) << (b - 3), self.max_ns) / 1000, 1)  # bucket's top
        return 0.0

    def as_dict(self):
        return {"ops": self.ops, "bytes": self.bytes, "errors": self.errors,
                "p50": self._percentile_us(0.5), "p99": self._percentile_us(0.99),
                "max": round(self.max_ns / 1000, 1)}


def _new_counters():
    """A queue's counters: request type code -> _Counter, and the one for everything else."""
    return {t: _Counter() for t in _KINDS}, _Counter()


class _DeviceQueue:
    """Per-virtqueue device state: the ring, one request slot per head, and the completion batch."""

    __slots__ = ("index", "ring", "read", "slots", "done", "lock", "draining", "queued", "dead", "popped",
                 "published", "idle", "counters", "other", "turn")

    def __init__(self, index, size_max, counters):
        self.index = index
        self.popped = 0  # heads taken from the avail ring (drainer only)
        self.published = 0  # used entries published (under ``lock``)
        self.idle = None  # an Event while someone waits for this queue to go idle
        self.ring = SplitQueue(size_max)
        self.read = None  # split rings: blk_request.frame_reader over the ring's table, made when it is enabled
        self.slots = ()
        self.done = collections.deque()  # (head, used_len, ring descriptors) waiting to be published
        self.lock = threading.Lock()  # the used side: add_used / publish / notification decision
        self.draining = False
        self.queued = False
        self.dead = False
        self.counters, self.other = counters  # kept across resets (see _new_counters)
        self.turn = 0  # the clock at the start of the current turn (ns)


class VirtioBlk:
    """A virtio-blk device over a ``vblock.block.Image``.

    ``VirtioBlk(img, mem, num_queues=1, queue_size_max=256, serial="vblock0", read_only=None,
    deliver="callback", state=None, stats=True)``: ``img`` is an open image
    (``vblock.open_image``); ``mem`` is the ``GuestMemory`` the queues live in; ``serial`` (str or
    bytes) is cut to 20 bytes; ``read_only`` None follows the image, True offers VIRTIO_BLK_F_RO
    over any image; ``deliver`` is ``"callback"`` or ``"poll"`` (see the module docstring);
    ``state`` is a dict from :meth:`save_state` to continue from; ``stats=False`` keeps no
    counters (only to measure what they cost). Bad arguments raise ``TypeError`` /
    ``ValueError`` naming the argument.
    """

    device_id = VIRTIO_ID_BLOCK

    def __init__(
        self,
        img: Image,
        mem: GuestMemory,
        num_queues: int = 1,
        queue_size_max: int = 256,
        serial: str | bytes = "vblock0",
        read_only: bool | None = None,
        *,
        deliver: str = "callback",
        state: dict | None = None,
        stats: bool = True,
    ) -> None:
        for attr in ("submit_read", "submit_write", "submit_flush"):
            if not callable(getattr(img, attr, None)):
                raise TypeError(
                    f"img must be an open image (vblock.open_image), not {type(img).__name__}"
                )
        if not isinstance(mem, GuestMemory):
            raise TypeError(f"mem must be a vblock.virtio.GuestMemory, not {type(mem).__name__}")
        _check_int("num_queues", num_queues, 1, 0xFFFF)
        _check_int("queue_size_max", queue_size_max, 1, 32768)
        if queue_size_max & (queue_size_max - 1):
            raise ValueError(f"queue_size_max {queue_size_max} is not a power of 2 in 1..32768")
        if not isinstance(serial, (str, bytes, bytearray)):
            raise TypeError(f"serial must be str or bytes, not {type(serial).__name__}")
        if read_only is not None and not isinstance(read_only, bool):
            raise TypeError(f"read_only must be None or a bool, not {type(read_only).__name__}")
        if deliver not in DELIVERY_MODES:
            raise ValueError(f"deliver must be 'callback' or 'poll', not {deliver!r}")
        if state is not None and not isinstance(state, dict):
            raise TypeError(f"state must be a dict from save_state(), not {type(state).__name__}")
        if read_only is None:
            read_only = bool(img.read_only)
        elif not read_only and img.read_only:
            raise ValueError("read_only=False over an image opened read-only")
        self.image = img
        self.mem = mem
        self.num_queues = num_queues
        self.queue_size_max = queue_size_max
        self.read_only = bool(read_only)
        serial = serial.encode() if isinstance(serial, str) else bytes(serial)
        self.serial = serial[:20]
        self.device_features = self._offered_features()
        self.deliver = deliver
        self._counting = bool(stats)
        self._counters = [_new_counters() for _ in range(num_queues)]
        self._poll_fd = None
        self._poll_signalled = False  # poll mode: the eventfd holds a count (see poll)
        self._poll_lock = threading.Lock()
        if deliver == "poll":
            self._poll_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self._closer = weakref.finalize(self, os.close, self._poll_fd)
        self._used_irq = self._config_irq = _ignore
        self._drain_lock = threading.Lock()
        self._drain_owner = None
        self._work = collections.deque()
        self.config_generation = 0
        self._queues = []
        self._reset_state()
        if state is not None:
            self._restore(state)

    # -- transport hooks ------------------------------------------------------------------------
    def attach(self, used_irq: Callable[[int], object], config_irq: Callable[[], object]) -> None:
        """Install the transport's interrupt hooks: ``used_irq(queue_index)``, ``config_irq()``.
        ``used_irq`` runs on the thread that publishes completions (see "Delivery" in the module
        docstring); ``config_irq`` on the thread that noticed the change (a kick, a config read,
        a resize through :meth:`update_capacity`)."""
        self._used_irq = used_irq
        self._config_irq = config_irq

    # -- features -------------------------------------------------------------------------------
    def _offered_features(self):
        bits = [
            VIRTIO_F_VERSION_1,
            VIRTIO_F_INDIRECT_DESC,
            VIRTIO_F_EVENT_IDX,
            VIRTIO_F_RING_PACKED,
            VIRTIO_BLK_F_SIZE_MAX,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_TOPOLOGY,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_CONFIG_WCE,  # 5.2.5.2: offered only together with FLUSH
            VIRTIO_BLK_F_MQ,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ]
        if self.read_only:
            bits.append(VIRTIO_BLK_F_RO)
        return sum(1 << b for b in bits)

    def set_driver_features(self, features: int) -> None:
        """The driver's feature bits (all 64). Accepted only between DRIVER and FEATURES_OK."""
        drv = self._status & ~(DEVICE_NEEDS_RESET | FAILED)
        if drv != ACKNOWLEDGE | DRIVER:
            raise StatusError(f"driver features written in status {self._status:#x}")
        self.driver_features = features

    def negotiated(self, bit: int) -> bool:
        return bool(self.driver_features >> bit & 1) and bool(self._status & FEATURES_OK)

    # -- status ---------------------------------------------------------------------------------
    @property
    def status(self) -> int:
        return self._status

    def set_status(self, value: int) -> None:
        """A driver's status write. 0 resets; otherwise one step of ``_STATUS_STEPS`` or FAILED.
        Raises ``StatusError`` (status unchanged) for anything else."""
        if value == 0:
            self.reset()
            return
        value &= ~DEVICE_NEEDS_RESET  # device-owned: a read-modify-write by the driver keeps it
        keep = self._status & DEVICE_NEEDS_RESET
        cur = self._status & ~(DEVICE_NEEDS_RESET | FAILED)
        if value & FAILED:
            self._status |= FAILED  # 2.1: the driver gave up; nothing more is served
            return
        if value == cur:
            return
        if _STATUS_STEPS.get(cur) != value:
            raise StatusError(f"status {self._status:#x} cannot become {value:#x}")
        if value & FEATURES_OK and not cur & FEATURES_OK:
            if not self._accept_features():
                return  # 3.1.1 step 6: FEATURES_OK stays clear; the driver reads it back
        self._status = value | keep
        if value & DRIVER_OK and not cur & DRIVER_OK:
            for dq in self._queues:  # buffers made available before DRIVER_OK are served now
                if dq.ring.ready:
                    self.notify(dq.index)

    def _accept_features(self):
        feats = self.driver_features
        if feats & ~self.device_features or not feats >> VIRTIO_F_VERSION_1 & 1:
            _log.debug("refusing driver features %#x (offered %#x)", feats, self.device_features)
            return False
        has = lambda bit: bool(feats >> bit & 1)  # noqa: E731
        self._event_idx = has(VIRTIO_F_EVENT_IDX)
        ring = PackedQueue if has(VIRTIO_F_RING_PACKED) else SplitQueue
        for dq in self._queues:  # queues are set up after FEATURES_OK (3.1.1 step 7)
            if not isinstance(dq.ring, ring):
                dq.ring = ring(self.queue_size_max)
        self._indirect = has(VIRTIO_F_INDIRECT_DESC)
        self._mq = has(VIRTIO_BLK_F_MQ)
        flush = has(VIRTIO_BLK_F_FLUSH)
        # 5.2.5.1 / 5.2.6.2 durability: without FLUSH (and without CONFIG_WCE) the driver assumes
        # writethrough, so every write is made stable before it completes (fua).
        self._wce = has(VIRTIO_BLK_F_CONFIG_WCE)
        self._writeback = flush  # CONFIG_WCE without FLUSH: writeback starts at 0 (5.2.5.2)
        self._rules.flush = flush
        self._rules.discard = has(VIRTIO_BLK_F_DISCARD)
        self._rules.write_zeroes = has(VIRTIO_BLK_F_WRITE_ZEROES)
        for dq in self._queues:  # a queue enabled too early (3.1.1 says after FEATURES_OK) reads with these
            if dq.ring.ready:
                self._bind_reader(dq)
        return True

    def reset(self) -> None:
        """Return to the initial state. Requests in flight are dropped safely (see module doc)."""
        me = threading.get_ident()
        if self._drain_owner == me:
            self._reset_state()  # reset from inside a drain (an interrupt handler): the drainer sees dead queues
            return
        with self._drain_lock:
            self._reset_state()

    def _reset_state(self):
        for dq in self._queues:
            with dq.lock:
                dq.dead = True
                dq.done.clear()
        self._work.clear()
        self._status = 0
        self.driver_features = 0
        self._event_idx = self._indirect = self._mq = self._wce = False
        self._writeback = True
        self._rules = RequestRules(
            self.image.size >> SECTOR_SHIFT,
            read_only=self.read_only,
            flush=False,
            discard=False,
            write_zeroes=False,
            max_discard_sectors=MAX_DISCARD_SECTORS,
            max_discard_seg=MAX_SEGMENTS,
            max_write_zeroes_sectors=MAX_DISCARD_SECTORS,
            max_write_zeroes_seg=MAX_SEGMENTS,
            serial=self.serial,
        )
        self._queues = [
            _DeviceQueue(i, self.queue_size_max, self._counters[i]) for i in range(self.num_queues)
        ]

    def _set_needs_reset(self, reason):
        _log.warning("virtio-blk: device needs reset: %s", reason)
        already = self._status & DEVICE_NEEDS_RESET
        self._status |= DEVICE_NEEDS_RESET
        if not already and self._status & DRIVER_OK:
            self._config_irq()  # 2.1.2: MUST send a config change notification

    # -- queues ---------------------------------------------------------------------------------
    def queue(self, index: int) -> SplitQueue | PackedQueue:
        """The ring state (``SplitQueue``, or ``PackedQueue`` once RING_PACKED is negotiated) of
        queue ``index``: transports write size and addresses into it."""
        return self._queues[index].ring

    def set_queue_ready(self, index: int, ready: bool) -> None:
        """Enable (check, resolve rings, start at index 0) or disable queue ``index``. Raises
        ``RingError`` when the queue cannot be enabled (it stays not ready)."""
        dq = self._queues[index]
        q = dq.ring
        if not ready:
            q.ready = False
            return
        if q.ready:
            return  # already enabled: re-enabling must not rewind a queue in use
        if index and not self._mq:
            raise RingError(f"queue {index} enabled but VIRTIO_BLK_F_MQ not negotiated")  # 5.2.2
        q.activate(self.mem, self._event_idx)
        self._bind_reader(dq)
        dq.slots = tuple(_Request(head, dq, self) for head in range(q.size))

    def _bind_reader(self, dq):
        q = dq.ring
        if not q.packed:
            dq.read = frame_reader(self.mem, q.desc_table, q.size, self._indirect, self.queue_size_max, self._rules)

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
                        raise RingError(f"head index {head} >= queue size {size}")  # 2.7.6 ring[] names a head
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
                    start(dq, bid, None if chain is None else functools.partial(_parse_into, chain, rules), ndesc)
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

    # -- config space (5.2.4) ---------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        """The 96-byte little-endian ``struct virtio_blk_config``."""
        r = self._rules
        return virtio_blk_config.pack(
            r.capacity_sectors,
            SIZE_MAX_BYTES,
            max(1, self.queue_size_max - 2),  # seg_max, as QEMU's seg-max-adjust
            0, 0, 0,  # geometry (not offered)
            SECTOR_SIZE,  # blk_size
            (PHYSICAL_BLOCK_BYTES // SECTOR_SIZE).bit_length() - 1,  # physical_block_exp
            0,  # alignment_offset
            1,  # min_io_size (blocks)
            0,  # opt_io_size
            1 if self._writeback else 0,
            0,  # unused0
            self.num_queues,
            MAX_DISCARD_SECTORS,
            MAX_SEGMENTS,
            PHYSICAL_BLOCK_BYTES // SECTOR_SIZE,  # discard_sector_alignment
            MAX_DISCARD_SECTORS,
            MAX_SEGMENTS,
            1,  # write_zeroes_may_unmap
            0, 0, 0,  # secure erase (not offered)
            0, 0, 0, 0, 0,  # zoned (not offered)
            0,
        )

    def read_config(self, offset: int, size: int) -> int:
        if self.image.size >> SECTOR_SHIFT != self._rules.capacity_sectors:
            self.update_capacity()
        cfg = self.config_bytes()
        if offset < 0 or size not in (1, 2, 4, 8) or offset + size > len(cfg):
            return 0
        return int.from_bytes(cfg[offset : offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        """Only ``writeback`` is writable, and only with CONFIG_WCE negotiated (5.2.4)."""
        if offset == VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET and size == 1 and self._wce:
            self._writeback = bool(value & 1)
            return
        raise GuestError(f"config write of {size} bytes at {offset:#x} ignored")

    def update_capacity(self) -> None:
        """Re-read the image size (after a resize): capacity follows, the config generation moves
        and a config-change interrupt goes out once the driver is up (5.2.6.2 MAY/SHOULD). The
        device also notices a new size by itself at its next queue turn or config read."""
        self._rules.capacity_sectors = self.image.size >> SECTOR_SHIFT
        self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
        if self._status & DRIVER_OK:
            self._config_irq()

    # -- hooks for transports that own memory and rings (vhost-user) ------------------------------
    def set_memory(self, mem: GuestMemory) -> None:
        """Replace guest memory (vhost-user SET_MEM_TABLE): ready queues re-resolve their rings
        at the same guest addresses and keep their indices. Raises ``RingError`` (memory
        unchanged) if a ready queue's rings are not inside ``mem``."""
        for dq in self._queues:
            if dq.ring.ready and dq.ring.check(mem) is not None:
                raise RingError(f"queue {dq.index}: {dq.ring.check(mem)}")
        self.mem = mem
        for dq in self._queues:
            if dq.ring.ready:
                dq.ring.rebind(mem)
                self._bind_reader(dq)

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

    # -- counters --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters for the device's life (they survive resets), keyed by request type: ``read``,
        ``write``, ``flush``, ``discard``, ``write_zeroes``, ``get_id`` and ``unsupported`` (any
        other type, and chains refused before their type could be read). Each holds ``ops``
        (virtio requests published), ``bytes`` (data bytes moved, or covered by discard /
        write-zeroes segments, by requests that succeeded; 0 for flush and get_id), ``errors``
        (answered with a status other than OK, or returned without one) and latency in
        microseconds, ``p50``, ``p99`` (each the top of its histogram bucket, within a quarter of
        an octave) and ``max``.
        ``queues`` holds the same dict per queue. A snapshot: safe from any thread; a request
        being published meanwhile may or may not be in it. All zero with ``stats=False``."""
        per_queue = []
        total = {kind: _Counter() for kind in STATS_KEYS}
        for counters, other in self._counters:
            entry = {}
            for kind, c in [*((_KINDS[t], c) for t, c in counters.items()), ("unsupported", other)]:
                snap = _Counter()
                snap.add(c)
                total[kind].add(snap)
                entry[kind] = snap.as_dict()
            per_queue.append(entry)
        out: dict[str, Any] = {kind: c.as_dict() for kind, c in total.items()}
        out["queues"] = per_queue
        return out

    # -- snapshots -------------------------------------------------------------------------------
    def save_state(self) -> dict[str, Any]:
        """The device's state as JSON-serialisable plain values: features, status, config
        generation and write-cache mode, and per queue its ring addresses, size, indices,
        enabled flag and event-index state. Guest memory (rings, buffers) is the emulator's to
        save. Transport registers (``VirtioMmio``'s InterruptStatus, selectors) are not part of
        it.

        Raises ``RuntimeError`` while requests are in flight or completions wait to be
        published. To quiesce: stop the vCPUs so nothing more is kicked, then wait for the
        device to go idle - ``dev.wait_idle()`` with ``deliver="callback"``, or call
        ``dev.poll()`` until ``dev.in_flight()`` is 0 and ``poll()`` returns 0 with
        ``deliver="poll"`` - and save."""
        if not self._drain_lock.acquire(False):
            raise RuntimeError("cannot save the device state during a queue drain: quiesce first")
        try:
            busy = sum(dq.popped - dq.published for dq in self._queues if not dq.dead)
            if busy:
                raise RuntimeError(
                    f"cannot save the device state with {busy} requests in flight: stop the vCPUs,"
                    " then wait_idle() (callback delivery) or poll() until idle (poll delivery)")
            queues = []
            for dq in self._queues:
                q = dq.ring
                fields = _PACKED_FIELDS if q.packed else _SPLIT_FIELDS
                queues.append({"packed": q.packed, **{name: getattr(q, name) for name in fields}})
            return {
                "version": _SAVED_STATE_VERSION,
                "num_queues": self.num_queues,
                "queue_size_max": self.queue_size_max,
                "device_features": self.device_features,
                "driver_features": self.driver_features,
                "status": self._status,
                "config_generation": self.config_generation,
                "writeback": self._writeback,
                "queues": queues,
            }
        finally:
            self._drain_lock.release()

    def _restore(self, state):
        """Continue from ``save_state()``'s dict (a fresh device, over the same guest memory)."""
        try:
            if state["version"] != _SAVED_STATE_VERSION:
                raise ValueError(f"state version {state['version']!r} is not 1")
            for name in ("num_queues", "queue_size_max", "device_features"):
                if state[name] != getattr(self, name):
                    mine = getattr(self, name)
                    raise ValueError(f"state has {name} {state[name]:#x}, this device {mine:#x}")
            if len(state["queues"]) != self.num_queues:
                raise ValueError(f"state has {len(state['queues'])} queues, not {self.num_queues}")
            status = state["status"]
            self.driver_features = state["driver_features"]
            if status & FEATURES_OK and not self._accept_features():
                raise ValueError(f"state's driver features {self.driver_features:#x} are refused")
            self._status = status
            self.config_generation = state["config_generation"]
            self._writeback = bool(state["writeback"])
            for index, saved in enumerate(state["queues"]):
                q = self._queues[index].ring
                if bool(saved["packed"]) != q.packed:
                    raise ValueError(f"state's queue {index} ring type does not match its features")
                q.size = saved["size"]
                q.desc_addr, q.driver_addr, q.device_addr = (
                    saved["desc_addr"], saved["driver_addr"], saved["device_addr"])
                if saved["ready"]:
                    self.set_queue_ready(index, True)  # RingError if the rings are not in memory
                    for name in _PACKED_FIELDS if q.packed else _SPLIT_FIELDS:
                        if name not in _RING_CONFIG:
                            setattr(q, name, saved[name])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"state is not a dict from save_state(): {exc!r}") from None
        except GuestError as exc:
            raise ValueError(f"state does not fit this guest memory: {exc}") from None

    # -- introspection ---------------------------------------------------------------------------
    def in_flight(self) -> int:
        """Requests submitted to the backend and not yet completed, over all queues."""
        return sum(r.busy for dq in self._queues for r in dq.slots)


def _ignore(*_args):
    pass


def _signal_poll(dev):
    dev._completions_wait()


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} out of {low}..{high}")


# What save_state keeps of each ring; the first five are its configuration, the rest its indices
# and event-index state.
_RING_CONFIG = ("size", "desc_addr", "driver_addr", "device_addr", "ready")
_SPLIT_FIELDS = (*_RING_CONFIG, "event_idx", "next_avail", "next_used", "signalled_used")
_PACKED_FIELDS = (*_RING_CONFIG, "event_idx", "next_avail", "avail_wrap", "avail_pos", "next_used",
                  "used_wrap", "used_pos", "signalled_pos")


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

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

Reset drops everything safely: queues in flight are retired (their late completions touch neither
rings nor status bytes) and fresh queue state takes their place. Data a backend has already been
asked to move still lands in guest memory, as DMA in flight would.

The device is split by idea over four modules:

- here: construction, the transport hooks, feature negotiation, the status machine, queue setup,
  the config space (5.2.4) and reset - the control side, driven by the transport;
- ``blk_datapath``: the request path ``VirtioBlk`` inherits (``BlkDataPath``): queue turns,
  submission to the image, completion, publishing and delivery (``deliver="callback"`` or
  ``"poll"``), and what the device does with guest mistakes (they never raise out of it);
- ``blk_stats``: the counters and latency histogram behind :meth:`VirtioBlk.stats`;
- ``blk_snapshot``: :meth:`VirtioBlk.save_state` and ``VirtioBlk(..., state=saved)``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from vblock.errors import GuestError
from vblock.virtio import blk_snapshot
from vblock.virtio.blk_datapath import BlkDataPath, DeviceQueue, DeviceRequest
from vblock.virtio.blk_request import RequestRules, frame_reader
from vblock.virtio.blk_stats import STATS_KEYS as STATS_KEYS  # re-exported: its old home
from vblock.virtio.blk_stats import new_counters, report
from vblock.virtio.chain import RingError
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
    VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET,
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
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_RING_PACKED,
    VIRTIO_F_VERSION_1,
    VIRTIO_ID_BLOCK,
    virtio_blk_config,
)

if TYPE_CHECKING:
    from vblock.block import Image

__all__ = ["VirtioBlk", "StatusError"]

_log = logging.getLogger(__name__)

DELIVERY_MODES = ("callback", "poll")

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


class VirtioBlk(BlkDataPath):
    """A virtio-blk device over a ``vblock.block.Image``.

    ``VirtioBlk(img, mem, num_queues=1, queue_size_max=256, serial="vblock0", read_only=None,
    deliver="callback", state=None, stats=True)``: ``img`` is an open image
    (``vblock.open_image``); ``mem`` is the ``GuestMemory`` the queues live in; ``serial`` (str or
    bytes) is cut to 20 bytes; ``read_only`` None follows the image, True offers VIRTIO_BLK_F_RO
    over any image; ``deliver`` is ``"callback"`` or ``"poll"`` (see ``blk_datapath``);
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
        # A queue turn's requests reach the host in one system call (an image without batching,
        # such as a test's fake, sends them one by one).
        self._host_batch = getattr(img, "batch", None) or contextlib.nullcontext
        self.mem = mem
        self.num_queues = num_queues
        self.queue_size_max = queue_size_max
        self.read_only = bool(read_only)
        serial = serial.encode() if isinstance(serial, str) else bytes(serial)
        self.serial = serial[:20]
        self.device_features = self._offered_features()
        self._init_datapath(deliver)
        self._counting = bool(stats)
        self._counters = [new_counters() for _ in range(num_queues)]
        self._used_irq = self._config_irq = _ignore
        self.config_generation = 0
        self._queues = []
        self._reset_state()
        if state is not None:
            blk_snapshot.restore(self, state)

    # -- transport hooks ------------------------------------------------------------------------
    def attach(self, used_irq: Callable[[int], object], config_irq: Callable[[], object]) -> None:
        """Install the transport's interrupt hooks: ``used_irq(queue_index)``, ``config_irq()``.
        ``used_irq`` runs on the thread that publishes completions (see "Delivery" in
        ``blk_datapath``'s docstring); ``config_irq`` on the thread that noticed the change (a
        kick, a config read, a resize through :meth:`update_capacity`)."""
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
        for dq in (
            self._queues
        ):  # a queue enabled too early (3.1.1 says after FEATURES_OK) reads with these
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
            DeviceQueue(i, self.queue_size_max, self._counters[i]) for i in range(self.num_queues)
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
        dq.slots = tuple(DeviceRequest(head, dq, self) for head in range(q.size))

    def _bind_reader(self, dq):
        q = dq.ring
        if not q.packed:
            dq.read = frame_reader(
                self.mem, q.desc_table, q.size, self._indirect, self.queue_size_max, self._rules
            )

    # -- config space (5.2.4) ---------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        """The 96-byte little-endian ``struct virtio_blk_config``."""
        r = self._rules
        return virtio_blk_config.pack(
            r.capacity_sectors,
            SIZE_MAX_BYTES,
            max(1, self.queue_size_max - 2),  # seg_max, as QEMU's seg-max-adjust
            0,
            0,
            0,  # geometry (not offered)
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
            0,
            0,
            0,  # secure erase (not offered)
            0,
            0,
            0,
            0,
            0,  # zoned (not offered)
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
        return report(self._counters)

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
        return blk_snapshot.save(self)


def _ignore(*_args):
    pass


def _check_int(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"{name} {value} out of {low}..{high}")

"""The packed virtqueue (virtio 1.2, 2.8; VIRTIO_F_RING_PACKED): ring state and notifications.

One ring of ``size`` 16-byte descriptors (any size up to 32768, not only powers of 2) shared by
both sides, plus two 4-byte event suppression structures: the driver's (``driver_addr``: when
the device should interrupt) and the device's (``device_addr``: when the driver should kick).

Each side walks the ring with a position and a 1-bit wrap counter that starts at 1 and flips
every lap. A descriptor at the device's position is available when its AVAIL flag equals the
device's avail wrap counter and its USED flag does not (2.8.1). A chain is a run of consecutive
descriptors joined by NEXT; the device uses it by writing one used descriptor (buffer ID, length,
AVAIL = USED = its used wrap counter) at its used position, then skipping as many positions as the
chain took (2.8.7) - completions may come in any order, the used descriptors go in completion
order.

The interface mirrors ``SplitQueue`` where the device loop needs it (setup, notification
suppression, ``add_used`` / ``publish_used`` / ``needs_notification``); the draining side is
``available()`` / ``walk()`` / ``advance()``. Positions are also kept as absolute counts
(``avail_pos`` / ``used_pos``) so event positions compare without modular puzzles
(``spec.packed_need_event``). Memory ordering: as in ``queue.py``; the flags of a used
descriptor are written after its id and length, and they are what publishes it.
"""

from __future__ import annotations

from vblock.virtio import queue as _split
from vblock.virtio.chain import RingError, walk_packed
from vblock.virtio.spec import (
    PACKED_EVENT_ALIGN,
    PVIRTQ_FLAGS_OFFSET,
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    RING_EVENT_FLAGS_ENABLE,
    VIRTQ_DESC_ALIGN,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_MAX_SIZE,
    le16,
    le32,
    packed_need_event,
    packed_ring_bytes,
    pvirtq_event_suppress,
)

__all__ = ["PackedQueue"]

_unpack16 = le16.unpack_from
_pack16 = le16.pack_into
_pack_len_id = le32.pack_into
_unpack_event = pvirtq_event_suppress.unpack_from
_pack_event = pvirtq_event_suppress.pack_into


class PackedQueue(_split.RingSetup):
    """State of one packed virtqueue (see the module docstring and ``RingSetup``)."""

    packed = True

    __slots__ = (
        "next_avail",
        "avail_wrap",
        "avail_pos",
        "next_used",
        "used_wrap",
        "used_pos",
        "signalled_pos",
        "ring",
        "driver_event",
        "device_event",
    )

    # -- setup (2.8: any size up to 2^15, alignment, placement) ---------------------------------
    def _size_problem(self):
        size = self.size
        if not 0 < size <= min(self.size_max, VIRTQ_MAX_SIZE):
            return f"queue size {size} is not in 1..{self.size_max}"
        return None

    def _areas(self):
        return (
            ("descriptor ring", self.desc_addr, VIRTQ_DESC_ALIGN, packed_ring_bytes(self.size)),
            ("driver event suppression", self.driver_addr, PACKED_EVENT_ALIGN, 4),
            ("device event suppression", self.device_addr, PACKED_EVENT_ALIGN, 4),
        )

    def _start(self):
        self.next_avail = self.next_used = 0
        self.avail_wrap = self.used_wrap = 1  # 2.8.1: both counters start at 1
        self.avail_pos = self.used_pos = self.signalled_pos = 0

    def _unbind(self):
        self.ring = self.driver_event = self.device_event = None

    def _bind(self, mem):
        self.ring = mem.view(self.desc_addr, packed_ring_bytes(self.size))
        self.driver_event = mem.view(self.driver_addr, 4)
        self.device_event = mem.view(self.device_addr, 4)

    # -- available side -------------------------------------------------------------------------
    def available(self):
        """Whether the descriptor at the device's position is available (2.8.1)."""
        flags = _unpack16(self.ring, 16 * self.next_avail + PVIRTQ_FLAGS_OFFSET)[0]
        wrap = self.avail_wrap
        ok = bool(flags & VIRTQ_DESC_F_AVAIL) == wrap and bool(flags & VIRTQ_DESC_F_USED) != wrap
        if ok:
            _split.acquire_fence()  # FENCE acquire: the rest of the chain after the head's flags
        return ok

    def walk(self, mem, indirect_ok, indirect_max):
        """The chain at the device's position: ``(buffer_id, ring_descs, chain)`` (see
        ``chain.walk_packed``); a buffer ID out of range is a ``RingError``."""
        buffer_id, ndesc, chain = walk_packed(
            mem, self.ring, self.size, self.next_avail, indirect_ok, indirect_max
        )
        if buffer_id >= self.size:
            raise RingError(f"buffer id {buffer_id} >= queue size {self.size}")
        return buffer_id, ndesc, chain

    def advance(self, ndesc):
        """Move past a chain of ``ndesc`` ring descriptors."""
        p = self.next_avail + ndesc
        if p >= self.size:
            p -= self.size
            self.avail_wrap ^= 1
        self.next_avail = p
        self.avail_pos += ndesc

    # -- used side ------------------------------------------------------------------------------
    def add_used(self, buffer_id, length, ndesc):
        """Write one used descriptor (2.8.7): id and length, then the flags that publish it; the
        next one goes ``ndesc`` positions on (the ring descriptors the chain took)."""
        p = self.next_used
        off = 16 * p
        ring = self.ring
        _pack_len_id(ring, off + 8, length)
        _pack16(ring, off + 12, buffer_id)
        flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if self.used_wrap else 0
        if length:
            flags |= VIRTQ_DESC_F_WRITE
        _split.release_fence()  # FENCE release: id, length, data and status before the flags
        _pack16(ring, off + PVIRTQ_FLAGS_OFFSET, flags)
        p += ndesc
        if p >= self.size:
            p -= self.size
            self.used_wrap ^= 1
        self.next_used = p
        self.used_pos += ndesc

    def publish_used(self):
        """Nothing to do: each used descriptor's flags published it."""

    def needs_notification(self):
        """2.8.10: the driver's event suppression decides (DESC only with EVENT_IDX)."""
        _split.full_fence()  # FENCE full: used flags before the suppression structure
        old, new = self.signalled_pos, self.used_pos
        self.signalled_pos = new
        if new == old:
            return False
        off_wrap, flags = _unpack_event(self.driver_event)
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == RING_EVENT_FLAGS_DESC and self.event_idx:
            return packed_need_event(off_wrap, self.size, old, new)
        return True

    # -- available-buffer notification suppression -----------------------------------------------
    def disable_notification(self):
        _pack_event(self.device_event, 0, 0, RING_EVENT_FLAGS_DISABLE)

    def enable_notification(self):
        """Ask for a kick on the next buffer (at our position with EVENT_IDX), then re-check."""
        if self.event_idx:
            _pack_event(
                self.device_event, 0, self.next_avail | self.avail_wrap << 15, RING_EVENT_FLAGS_DESC
            )
        else:
            _pack_event(self.device_event, 0, 0, RING_EVENT_FLAGS_ENABLE)
        _split.full_fence()  # FENCE full: the re-enable before re-reading the ring
        return self.available()

    def state(self):
        return {
            "size": self.size,
            "ready": self.ready,
            "desc_addr": self.desc_addr,
            "driver_addr": self.driver_addr,
            "device_addr": self.device_addr,
            "event_idx": self.event_idx,
            "next_avail": self.next_avail,
            "avail_wrap": self.avail_wrap,
            "next_used": self.next_used,
            "used_wrap": self.used_wrap,
        }

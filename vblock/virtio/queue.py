"""The split virtqueue (virtio 1.2, 2.7): ring state, the available side, the used side, and
notification suppression.

``SplitQueue`` is plain state - size, the three ring addresses, the free-running ``next_avail`` /
``next_used`` indices, the EVENT_IDX flag and the used index at the last notification decision -
plus views of the three rings that :meth:`SplitQueue.activate` resolves once, against the guest
memory passed to it (regions are fixed for the life of a ``GuestMemory``, so the views stay valid;
re-resolving three ranges per request would cost more than the whole ring update). Descriptor
chains are walked by :func:`vblock.virtio.chain.walk` with guest memory passed in.

The canonical device loop (see ``VirtioBlk``)::

    q.disable_notification()
    while True:
        for _ in range(q.available()):   # RingError if the driver ran ahead by more than size
            head = q.pop_head(); ...     # walk, parse, submit
        if not q.enable_notification():  # re-enable, fence, re-check: more arrived?
            break
    ... completions: q.add_used(head, len) for each; q.publish_used(); if q.needs_notification(): irq

Memory ordering. The spec's driver (2.7.13) writes descriptors and ring entries, then the avail
index, then reads the suppression fields. The device mirrors it at four places, marked ``FENCE``
below: acquire after reading the avail index (before ring entries and descriptors); release
before publishing the used index (after used entries, data and status bytes); a full fence before
reading ``used_event`` / the avail flags; a full fence after re-enabling notifications and before
re-checking the avail index. In-process Python needs nothing more: every ``pack_into`` /
``unpack_from`` is one C call made under the GIL, and the GIL hand-off between threads is itself a
full barrier, so every Python thread observes these stores in program order. A guest running
concurrently on another CPU (KVM, a vhost-user frontend) needs real fences there: the virtio
accelerator's (``vblock.virtio._binding``: ``fence_acquire`` / ``fence_release`` / ``fence_full``),
installed with :func:`use_native_fences` (or any others with :func:`set_fence`).
"""

from __future__ import annotations

from vblock.virtio.chain import RingError
from vblock.virtio.spec import (
    VIRTQ_AVAIL_ALIGN,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_ALIGN,
    VIRTQ_MAX_SIZE,
    VIRTQ_USED_ALIGN,
    VIRTQ_USED_F_NO_NOTIFY,
    avail_ring_bytes,
    desc_table_bytes,
    le16,
    used_ring_bytes,
    virtq_used_elem,
    vring_need_event,
)

__all__ = ["RingSetup", "SplitQueue", "set_fence", "use_native_fences"]

_unpack16 = le16.unpack_from
_pack16 = le16.pack_into
_pack_elem = virtq_used_elem.pack_into


def _no_fence():
    """In-process Python: the GIL orders every store and load (see the module docstring)."""


acquire_fence = release_fence = full_fence = _no_fence


def set_fence(acquire, release, full):
    """Install fences for guests that run concurrently with the device (process-wide)."""
    global acquire_fence, release_fence, full_fence
    acquire_fence, release_fence, full_fence = acquire, release, full


def use_native_fences(enable=True):
    """Use the virtio accelerator's CPU fences (for rings shared with another process or a
    running vCPU), or go back to none with ``enable=False``."""
    if not enable:
        set_fence(_no_fence, _no_fence, _no_fence)
        return
    from vblock.virtio._binding import fence_acquire, fence_full, fence_release

    set_fence(fence_acquire, fence_release, fence_full)


def check_areas(mem, areas):
    """The first problem with ``areas`` = ``[(name, addr, alignment, length)]`` of a ring
    (misaligned, or not inside guest memory), or ``None``."""
    for name, addr, align, length in areas:
        if addr % align:
            return f"{name} at {addr:#x} is not {align}-byte aligned"
        if not mem.contains(addr, length):
            return f"{name} at {addr:#x}+{length:#x} is not inside guest memory"
    return None


class RingSetup:
    """What split and packed queues share: the transport's setters (``size``, ``desc_addr``,
    ``driver_addr``, ``device_addr``: plain attributes, written while the queue is not ready),
    readiness, the EVENT_IDX flag, and the steps from setters to a usable ring. A subclass names
    its layout (``_size_problem``, ``_areas``), resolves its views (``_bind``, ``_unbind``) and
    sets its starting indices (``_start``)."""

    __slots__ = (
        "size_max",
        "size",
        "desc_addr",
        "driver_addr",
        "device_addr",
        "ready",
        "event_idx",
    )

    def __init__(self, size_max):
        self.size_max = size_max
        self.reset()

    def reset(self):
        self.size = self.size_max  # mmio: QueueNum defaults to the maximum until written
        self.desc_addr = self.driver_addr = self.device_addr = 0
        self.ready = False
        self.event_idx = False
        self._start()
        self._unbind()

    def check(self, mem):
        """Why this queue cannot be activated, or ``None`` (size, alignment, placement)."""
        return self._size_problem() or check_areas(mem, self._areas())

    def activate(self, mem, event_idx):
        """Resolve the ring views and start at the beginning. Raises ``RingError`` if
        :meth:`check` finds a problem."""
        self.rebind(mem)
        self.event_idx = event_idx
        self._start()
        self.ready = True

    def rebind(self, mem):
        """Resolve the ring views in ``mem`` (new guest memory, same guest addresses), keeping
        the indices. Raises ``RingError`` if :meth:`check` finds a problem."""
        problem = self.check(mem)
        if problem is not None:
            raise RingError(problem)
        self._bind(mem)


class SplitQueue(RingSetup):
    """State of one split virtqueue (see the module docstring and ``RingSetup``)."""

    packed = False

    __slots__ = (
        "next_avail",
        "next_used",
        "signalled_used",
        "desc_table",
        "avail",
        "used",
        "_used_event_off",
        "_avail_event_off",
    )

    # -- setup (2.7: size, alignment, placement) ------------------------------------------------
    def _size_problem(self):
        size = self.size
        if size == 0 or size & (size - 1) or size > min(self.size_max, VIRTQ_MAX_SIZE):
            return f"queue size {size} is not a power of 2 in 1..{self.size_max}"
        return None

    def _areas(self):
        size = self.size
        return (
            ("descriptor table", self.desc_addr, VIRTQ_DESC_ALIGN, desc_table_bytes(size)),
            ("available ring", self.driver_addr, VIRTQ_AVAIL_ALIGN, avail_ring_bytes(size)),
            ("used ring", self.device_addr, VIRTQ_USED_ALIGN, used_ring_bytes(size)),
        )

    def _start(self):
        self.next_avail = self.next_used = self.signalled_used = 0

    def _unbind(self):
        self.desc_table = self.avail = self.used = None

    def _bind(self, mem):
        size = self.size
        self.desc_table = mem.view(self.desc_addr, desc_table_bytes(size))
        self.avail = mem.view(self.driver_addr, avail_ring_bytes(size))
        self.used = mem.view(self.device_addr, used_ring_bytes(size))
        self._used_event_off = 4 + 2 * size  # avail.ring[size] (2.7.6)
        self._avail_event_off = 4 + 8 * size  # used.ring[size] (2.7.8)

    def restore(self, next_avail, next_used=None):
        """Continue where another device left off (vhost-user SET_VRING_BASE, migration):
        ``next_used`` None takes the used index the ring itself holds."""
        if next_used is None:
            next_used = _unpack16(self.used, 2)[0]
        self.next_avail = next_avail & 0xFFFF
        self.next_used = self.signalled_used = next_used & 0xFFFF

    # -- available side (device reads) ----------------------------------------------------------
    def avail_idx(self):
        return _unpack16(self.avail, 2)[0]

    def available(self):
        """How many heads the driver has made available beyond ``next_avail``. Raises
        ``RingError`` when that exceeds the queue size: the driver moved its index by more than it
        could have filled (2.7.6; vm-virtio#196), so nothing in the ring can be trusted."""
        n = (_unpack16(self.avail, 2)[0] - self.next_avail) & 0xFFFF
        if n > self.size:
            raise RingError(f"avail idx ran {n} entries ahead of a queue of {self.size}")
        acquire_fence()  # FENCE acquire: ring entries and descriptors after the index
        return n

    def pop_head(self):
        """The next available head index (not yet range-checked: the caller checks it against
        the queue size, as ``chain.walk`` does)."""
        i = self.next_avail
        self.next_avail = (i + 1) & 0xFFFF
        return _unpack16(self.avail, 4 + 2 * (i & (self.size - 1)))[0]

    # -- used side (device writes) --------------------------------------------------------------
    def add_used(self, head, length, _ndesc=1):
        """Write one used element; it becomes visible to the driver at :meth:`publish_used`.
        (``_ndesc`` is for the packed ring's signature; a split ring ignores it.)"""
        i = self.next_used
        _pack_elem(self.used, 4 + 8 * (i & (self.size - 1)), head, length)
        self.next_used = (i + 1) & 0xFFFF

    def publish_used(self):
        release_fence()  # FENCE release: elements, data and status bytes before the index (2.7.8)
        _pack16(self.used, 2, self.next_used)

    def needs_notification(self):
        """Whether to send a used-buffer notification for what was published since the last
        decision (2.7.7.2 with EVENT_IDX: ``vring_need_event(used_event, new, old)``; without it,
        unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT)."""
        full_fence()  # FENCE full: used idx store before the used_event / flags load
        new = self.next_used
        old = self.signalled_used
        self.signalled_used = new
        if self.event_idx:
            return vring_need_event(_unpack16(self.avail, self._used_event_off)[0], new, old)
        return new != old and not _unpack16(self.avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT

    # -- available-buffer notification suppression (2.7.10) --------------------------------------
    def disable_notification(self):
        """Ask the driver not to notify while the device drains. With EVENT_IDX nothing is
        written: ``avail_event`` stays behind, which already suppresses kicks."""
        if not self.event_idx:
            _pack16(self.used, 0, VIRTQ_USED_F_NO_NOTIFY)

    def enable_notification(self):
        """Ask for a notification on the next buffer, then re-check: returns True if buffers
        arrived meanwhile (the caller drains again instead of waiting for a kick that may never
        come)."""
        if self.event_idx:
            _pack16(self.used, self._avail_event_off, self.next_avail)
        else:
            _pack16(self.used, 0, 0)
        full_fence()  # FENCE full: the re-enable store before re-reading avail idx
        return _unpack16(self.avail, 2)[0] != self.next_avail

    def state(self):
        """Plain-value snapshot (for tests and save/restore)."""
        return {
            "size": self.size,
            "ready": self.ready,
            "desc_addr": self.desc_addr,
            "driver_addr": self.driver_addr,
            "device_addr": self.device_addr,
            "event_idx": self.event_idx,
            "next_avail": self.next_avail,
            "next_used": self.next_used,
        }

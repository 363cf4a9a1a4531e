"""The driver side of a virtqueue in guest memory, for the guest-side test driver
(``vblock.virtio.driver``): :class:`DriverQueue` for split rings (2.7), :class:`PackedDriverQueue`
for packed rings (2.8, when VIRTIO_F_RING_PACKED is negotiated).

Both answer the calls ``Driver`` makes: ``room()``, ``take(req, ndesc)`` (reserve descriptors and
a head or buffer ID for a request), ``write_table(view, entries)`` (an indirect table),
``publish_chain(req, entries)``, ``needs_kick()`` (the notification decision, 2.7.10 / 2.8.10),
``reap_into(finish)`` and ``reap_raw()``; ``inflight`` maps a head or buffer ID to its request.
For hostile-guest tests each also exposes the raw ring: write any descriptor, publish any head,
set the available index to anything, and read used entries back.

Contract. A queue allocates its rings and per-head slots (32 bytes each: the 16-byte request
header, then the status byte) from ``driver.allocator`` when it is made, zeroes the rings (2.7,
2.8.1) and keeps them for its life; it reads ``driver.mem`` and ``driver.event_idx``. Addresses
are guest-physical, lengths in bytes, ring indices 16-bit and wrapping. Not thread-safe: the
driver's one thread uses it (the device reads and writes the same guest memory as a device
would).
"""

from __future__ import annotations

from vblock.virtio import spec as S
from vblock.virtio.spec import (
    VIRTQ_DESC_F_NEXT,
    le16,
    virtq_desc,
    virtq_used_elem,
    vring_need_event,
)

__all__ = ["DriverQueue", "PackedDriverQueue"]

_pack_desc = virtq_desc.pack_into
_pack16 = le16.pack_into
_unpack16 = le16.unpack_from
_unpack_elem = virtq_used_elem.unpack_from


class DriverQueue:
    """The driver side of one split virtqueue in guest memory."""

    def __init__(self, driver, index, size):
        self.driver = driver
        self.index = index
        self.size = size
        alloc = driver.allocator.alloc
        self.desc_addr = alloc(S.desc_table_bytes(size))
        self.avail_addr = alloc(S.avail_ring_bytes(size))
        self.used_addr = alloc(S.used_ring_bytes(size))
        self.slot_addr = alloc(32 * size)  # per head: 16-byte header + status byte
        mem = driver.mem
        for addr, n in (
            (self.desc_addr, S.desc_table_bytes(size)),
            (self.avail_addr, S.avail_ring_bytes(size)),
            (self.used_addr, S.used_ring_bytes(size)),
        ):
            mem.view(addr, n)[:] = bytes(n)  # 2.7: the driver zeroes the rings
        self.desc = mem.view(self.desc_addr, S.desc_table_bytes(size))
        self.avail = mem.view(self.avail_addr, S.avail_ring_bytes(size))
        self.used = mem.view(self.used_addr, S.used_ring_bytes(size))
        self.slots = mem.view(self.slot_addr, 32 * size)
        self.status_views = [
            self.slots[32 * h + 16 : 32 * h + 17] for h in range(size)
        ]  # post()'s status bytes
        self.free = list(range(size - 1, -1, -1))  # a stack of free descriptor indices
        self.avail_idx = 0  # shadow of avail.idx
        self.kicked_idx = 0  # avail idx at the last notification decision
        self.last_used = 0
        self.inflight = {}
        self.unknown = []  # used entries whose head the driver never issued (raw tests)

    # -- raw ring access (hostile tests) ----------------------------------------------------------
    def write_desc(self, index, addr, length, flags=0, next=0):
        _pack_desc(self.desc, 16 * index, addr, length, flags, next)

    def push_head(self, head, publish=True):
        """Put ``head`` in the next avail slot; ``publish`` also moves avail.idx past it."""
        _pack16(self.avail, 4 + 2 * (self.avail_idx % self.size), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        if publish:
            self.publish()

    def publish(self):
        _pack16(self.avail, 2, self.avail_idx)

    def set_avail_idx(self, value):
        self.avail_idx = value & 0xFFFF
        self.publish()

    def used_idx(self):
        return _unpack16(self.used, 2)[0]

    def used_flags(self):
        return _unpack16(self.used, 0)[0]

    def avail_event(self):
        return _unpack16(self.used, 4 + 8 * self.size)[0]

    def set_used_event(self, value):
        _pack16(self.avail, 4 + 2 * self.size, value & 0xFFFF)

    def set_avail_flags(self, value):
        _pack16(self.avail, 0, value)

    def reap_raw(self):
        """Used entries published since the last reap, as ``[(id, len)]``."""
        out = []
        used = self.used
        end = self.used_idx()
        i = self.last_used
        while i != end:
            out.append(_unpack_elem(used, 4 + 8 * (i % self.size)))
            i = (i + 1) & 0xFFFF
        self.last_used = end
        return out

    # -- the kick decision (2.7.10) ----------------------------------------------------------------
    def needs_kick(self):
        new, old = self.avail_idx, self.kicked_idx
        self.kicked_idx = new
        if new == old:
            return False
        if self.driver.event_idx:
            return vring_need_event(self.avail_event(), new, old)
        return not self.used_flags() & S.VIRTQ_USED_F_NO_NOTIFY

    # -- what Driver.submit / reap use ---------------------------------------------------------------
    packed = False

    def room(self):
        """Descriptors that can be used now."""
        return len(self.free)

    def take(self, req, ndesc):
        """Reserve ``ndesc`` descriptors for ``req``; returns its head."""
        free = self.free
        req.descs = [free.pop() for _ in range(ndesc)]
        return req.descs[0]

    def write_table(self, view, entries):
        last = len(entries) - 1
        for i, (a, n, f) in enumerate(entries):
            _pack_desc(
                view,
                16 * i,
                a,
                n,
                f | (VIRTQ_DESC_F_NEXT if i < last else 0),
                i + 1 if i < last else 0,
            )

    def publish_chain(self, req, entries):
        idx = req.descs
        desc = self.desc
        last = len(entries) - 1
        for i, (a, n, f) in enumerate(entries):
            if i < last:
                _pack_desc(desc, 16 * idx[i], a, n, f | VIRTQ_DESC_F_NEXT, idx[i + 1])
            else:
                _pack_desc(desc, 16 * idx[i], a, n, f, 0)
        _pack16(self.avail, 4 + 2 * (self.avail_idx % self.size), req.head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        _pack16(self.avail, 2, self.avail_idx)  # 2.7.13: ring entry before the index

    def reap_into(self, finish):
        """Call ``finish(req, used_len)`` for every completion published since the last reap."""
        used = self.used
        end = _unpack16(used, 2)[0]
        i = self.last_used
        mask = self.size - 1
        inflight = self.inflight
        while i != end:
            head, length = _unpack_elem(used, 4 + 8 * (i & mask))
            i = (i + 1) & 0xFFFF
            req = inflight.pop(head, None)
            if req is None:
                self.unknown.append((head, length))
                continue
            self.free.extend(req.descs)
            finish(req, length)
        self.last_used = i
        if self.driver.event_idx:
            self.set_used_event(i)  # 2.7.7.2: interrupt me at the next completion


class PackedDriverQueue:
    """The driver side of one packed virtqueue (2.8): ring positions with wrap counters, buffer
    IDs (one per request, < size; the per-ID header/status slot plays the per-head slot's part),
    and the two event suppression structures."""

    packed = True

    def __init__(self, driver, index, size):
        self.driver = driver
        self.index = index
        self.size = size
        alloc = driver.allocator.alloc
        self.desc_addr = alloc(S.packed_ring_bytes(size))
        self.avail_addr = alloc(4)  # driver event suppression (the "driver area")
        self.used_addr = alloc(4)  # device event suppression (the "device area")
        self.slot_addr = alloc(32 * size)
        mem = driver.mem
        mem.view(self.desc_addr, S.packed_ring_bytes(size))[:] = bytes(
            S.packed_ring_bytes(size)
        )  # 2.8.1
        mem.view(self.avail_addr, 4)[:] = bytes(4)
        mem.view(self.used_addr, 4)[:] = bytes(4)
        self.ring = mem.view(self.desc_addr, S.packed_ring_bytes(size))
        self.driver_event = mem.view(self.avail_addr, 4)
        self.device_event = mem.view(self.used_addr, 4)
        self.slots = mem.view(self.slot_addr, 32 * size)
        self.next_avail, self.avail_wrap, self.avail_pos = 0, 1, 0
        self.kicked_pos = 0
        self.last_used, self.used_wrap = 0, 1
        self.free_ids = list(range(size - 1, -1, -1))
        self.num_free = size
        self.inflight = {}
        self.unknown = []
        self.raw_chains = {}  # buffer id -> ring descriptors, for chains published raw

    def avail_flags(self, wrap=None):
        """AVAIL/USED bits that make a descriptor available in lap ``wrap`` (2.8.1)."""
        w = self.avail_wrap if wrap is None else wrap
        return S.VIRTQ_DESC_F_AVAIL if w else S.VIRTQ_DESC_F_USED

    def room(self):
        return self.num_free if self.free_ids else 0

    def take(self, req, ndesc):
        req.descs = ndesc
        self.num_free -= ndesc
        return self.free_ids.pop()

    def write_table(self, view, entries):
        for i, (a, n, f) in enumerate(entries):
            S.pvirtq_desc.pack_into(view, 16 * i, a, n, 0, f)  # 2.8.19: entries in order, no NEXT

    def publish_chain(self, req, entries):
        """Write the chain at the next positions; the first descriptor's flags go last (2.8.21)."""
        last = len(entries) - 1
        self._write_chain(
            [
                (a, n, f | (VIRTQ_DESC_F_NEXT if i < last else 0))
                for i, (a, n, f) in enumerate(entries)
            ],
            req.head,
        )

    def _write_chain(self, entries, buffer_id):
        ring, size = self.ring, self.size
        p, w = self.next_avail, self.avail_wrap
        first = None
        for i, (a, n, f) in enumerate(entries):
            flags = f | self.avail_flags(w)
            if i == 0:
                first = (p, flags)
                keep = _unpack16(ring, 16 * p + S.PVIRTQ_FLAGS_OFFSET)[0]  # still not available
                S.pvirtq_desc.pack_into(ring, 16 * p, a, n, buffer_id, keep)
            else:
                S.pvirtq_desc.pack_into(ring, 16 * p, a, n, buffer_id, flags)
            p += 1
            if p == size:
                p, w = 0, w ^ 1
        self.next_avail, self.avail_wrap = p, w
        self.avail_pos += len(entries)
        _pack16(ring, 16 * first[0] + S.PVIRTQ_FLAGS_OFFSET, first[1])  # publishes the chain

    def write_pdesc(self, pos, addr, length, buffer_id, flags):
        """Raw access (hostile tests): one descriptor at ring position ``pos``."""
        S.pvirtq_desc.pack_into(self.ring, 16 * pos, addr, length, buffer_id, flags)

    def publish_raw(self, entries, buffer_id):
        """Raw access: publish ``entries`` = [(addr, len, flags)] as written (NEXT is the
        caller's business) at the next positions, all with ``buffer_id``, the first made
        available last. Returns the position of the first."""
        start = self.next_avail
        self.raw_chains[buffer_id] = len(entries)
        if buffer_id in self.free_ids:
            self.free_ids.remove(buffer_id)
            self.free_ids.insert(0, buffer_id)  # handed out last, after the raw chain is back
        self._write_chain(entries, buffer_id)
        return start

    def reap_into(self, finish):
        ring, size = self.ring, self.size
        p, w = self.last_used, self.used_wrap
        inflight = self.inflight
        while True:
            _addr, length, buffer_id, flags = S.pvirtq_desc.unpack_from(ring, 16 * p)
            if bool(flags & S.VIRTQ_DESC_F_AVAIL) != w or bool(flags & S.VIRTQ_DESC_F_USED) != w:
                break
            req = inflight.pop(buffer_id, None)
            if req is None:
                self.unknown.append((buffer_id, length))
                n = self.raw_chains.pop(buffer_id, 1)
            else:
                n = req.descs
                self.num_free += n
                self.free_ids.append(buffer_id)
                finish(req, length)
            p += n
            if p >= size:
                p, w = p - size, w ^ 1
        self.last_used, self.used_wrap = p, w
        if self.driver.event_idx:  # 2.8.10: interrupt me when the next used descriptor is written
            S.pvirtq_event_suppress.pack_into(
                self.driver_event, 0, p | w << 15, S.RING_EVENT_FLAGS_DESC
            )

    def reap_raw(self):
        out = []
        self.reap_into(lambda req, n: None)
        out, self.unknown = self.unknown, []
        return out

    def needs_kick(self):
        new, old = self.avail_pos, self.kicked_pos
        self.kicked_pos = new
        if new == old:
            return False
        off_wrap, flags = S.pvirtq_event_suppress.unpack_from(self.device_event)
        if flags == S.RING_EVENT_FLAGS_DISABLE:
            return False
        if flags == S.RING_EVENT_FLAGS_DESC and self.driver.event_idx:
            return S.packed_need_event(off_wrap, self.size, old, new)
        return True

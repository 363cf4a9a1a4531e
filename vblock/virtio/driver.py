"""A guest-side virtio-blk driver for tests and benchmarks (our ``mock.rs``).

It talks to a device only through what a guest has: the virtio-mmio registers and guest memory.
:meth:`Driver.start` brings the device up through the steps of 3.1.1 (reset, ACKNOWLEDGE, DRIVER,
features, FEATURES_OK read back, queue setup, DRIVER_OK). Requests are laid out as descriptor
chains in guest memory - direct or indirect, data cut into any number of pieces, the header and
status in their own descriptors or merged with the data - published on the available ring, and
announced with a notification when the device's suppression state asks for one (EVENT_IDX or
NO_NOTIFY). Completions are reaped from the used ring, on interrupt or by polling.

The rings themselves are driven by one queue object each (``driver_queues``: ``DriverQueue``
for split rings, ``PackedDriverQueue`` for packed ones); for hostile-guest tests each also
exposes the raw ring: write any descriptor, publish any head, set the available index to
anything, and read used entries back.

Memory layout: the driver owns a window of guest memory (``arena_base``, ``arena_size``) and
allocates rings, per-head header/status slots, indirect tables and data buffers from it with a
small size-class allocator (``driver_alloc.GuestAllocator``). It is not thread-safe: drive it from one thread (interrupts, which
arrive on the device's completion threads, only acknowledge and set an event).

Interrupts: the driver listens with ``VirtioMmio.add_interrupt_listener``, so the ``interrupt`` and
``irq_level`` callbacks an emulator gave the transport stay in place; as the guest, it reads
InterruptStatus and acknowledges it. ``Driver(..., interrupts=False)`` polls instead: ``wait``
reaps the used ring without waiting for an interrupt (with a device in ``deliver="poll"`` mode it
also plays the emulator's loop and calls the device's ``poll()``).
"""

from __future__ import annotations

import select
import threading
import time

from vblock.virtio import spec as S
from vblock.virtio.driver_alloc import GuestAllocator
from vblock.virtio.driver_queues import DriverQueue, PackedDriverQueue
from vblock.virtio.spec import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    le16,
    virtio_blk_req_hdr,
    virtq_desc,
)

__all__ = ["Driver", "DriverQueue", "PackedDriverQueue", "Request", "DriverError", "GuestAllocator"]

_pack_desc = virtq_desc.pack_into
_pack_hdr = virtio_blk_req_hdr.pack_into
_pack16 = le16.pack_into
_T_IN = S.VIRTIO_BLK_T_IN
_new_request = object.__new__

WAIT_TIMEOUT = 60.0  # seconds: a safety net that turns a lost interrupt into a failure, not a hang


class DriverError(Exception):
    """The device did not behave as a driver expects (refused features, a queue, timed out)."""


class Request:
    """One request as the driver sees it. After completion: ``status`` (the status byte the device
    wrote), ``used_len`` and, for reads and GET_ID with driver-owned buffers, ``data``."""

    __slots__ = (
        "type",
        "sector",
        "queue",
        "head",
        "descs",
        "table",
        "bufs",
        "owned",
        "done",
        "status",
        "used_len",
        "data",
        "read_len",
        "status_addr",
        "status_view",
        "copy_out",
    )

    def __init__(self, type_, sector):
        self.type = type_
        self.sector = sector
        self.done = False
        self.status = None
        self.used_len = None
        self.data = None
        self.table = None
        self.owned = ()
        self.copy_out = True

    def __repr__(self):
        return (
            f"<Request type={self.type} sector={self.sector} done={self.done} status={self.status}>"
        )


class Driver:
    """``Driver(mmio, mem, ...)``: a virtio-blk driver over a ``VirtioMmio`` and the guest memory
    the device uses.

    ``event_idx`` / ``indirect``: negotiate VIRTIO_F_EVENT_IDX / VIRTIO_F_INDIRECT_DESC;
    ``num_queues``: how many request queues to enable (MQ is negotiated when > 1);
    ``queue_size``: entries per queue (default: the device maximum);
    ``packed``: negotiate VIRTIO_F_RING_PACKED (packed virtqueues);
    ``arena_base`` / ``arena_size``: the guest memory window the driver may use (default: all of
    the first region). ``features``: if given, exactly the feature bits to request (instead of
    everything this driver knows that the device offers). ``interrupts``: take completions on
    interrupt (True) or by polling the used ring (False). Bad arguments raise ``TypeError`` /
    ``ValueError`` naming the argument.
    """

    def __init__(
        self,
        mmio,
        mem,
        *,
        event_idx=True,
        indirect=False,
        num_queues=1,
        queue_size=None,
        arena_base=None,
        arena_size=None,
        features=None,
        interrupts=True,
        packed=False,
    ):
        from vblock.virtio.memory import GuestMemory

        for attr in ("read", "write", "add_interrupt_listener"):
            if not callable(getattr(mmio, attr, None)):
                raise TypeError(f"mmio must be a VirtioMmio, not {type(mmio).__name__}")
        if not isinstance(mem, GuestMemory):
            raise TypeError(f"mem must be a vblock.virtio.GuestMemory, not {type(mem).__name__}")
        if not _int_in(num_queues, 1, 0xFFFF):
            raise ValueError(f"num_queues must be an int in 1..65535, not {num_queues!r}")
        if queue_size is not None and not _int_in(queue_size, 1, 32768):
            raise ValueError(f"queue_size must be None or an int in 1..32768, not {queue_size!r}")
        flags = dict(event_idx=event_idx, indirect=indirect, interrupts=interrupts, packed=packed)
        for name, value in flags.items():
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, not {type(value).__name__}")
        self.mmio = mmio
        self.mem = mem
        self.event_idx = event_idx
        self.indirect = indirect
        self.num_queues_wanted = num_queues
        self.queue_size = queue_size
        base, view = mem.regions[0]
        if arena_base is None:
            arena_base = base
        if arena_size is None:
            arena_size = base + len(view) - arena_base
        self.allocator = GuestAllocator(arena_base, arena_size)
        self.wanted_features = features
        self.packed = packed
        self.queues = []
        self._rr = 0
        self._irq = threading.Event()
        self.interrupts = 0
        self.config_interrupts = 0
        self.uses_interrupts = interrupts
        if interrupts:
            mmio.add_interrupt_listener(self._on_interrupt)
        self.features = 0

    # -- registers ------------------------------------------------------------------------------
    def r32(self, offset):
        return self.mmio.read(offset, 4)

    def w32(self, offset, value):
        self.mmio.write(offset, 4, value)

    def status(self):
        return self.r32(S.VIRTIO_MMIO_STATUS)

    def _on_interrupt(self):
        isr = self.mmio.read(S.VIRTIO_MMIO_INTERRUPT_STATUS, 4)
        if isr:
            self.mmio.write(S.VIRTIO_MMIO_INTERRUPT_ACK, 4, isr)
        self.interrupts += 1
        if isr & S.VIRTIO_MMIO_INT_CONFIG:
            self.config_interrupts += 1
        self._irq.set()

    def config(self, offset, size):
        return self.mmio.read(S.VIRTIO_MMIO_CONFIG + offset, size)

    @property
    def capacity(self):
        return self.config(0, 8)

    # -- bring-up (3.1.1) ------------------------------------------------------------------------
    def start(self, driver_ok=True):
        """Bring the device up (3.1.1); ``driver_ok=False`` stops before setting DRIVER_OK."""
        if (
            self.r32(S.VIRTIO_MMIO_MAGIC_VALUE) != S.MMIO_MAGIC_VALUE
            or self.r32(S.VIRTIO_MMIO_VERSION) != 2
        ):
            raise DriverError("not a virtio-mmio v2 device")
        if self.r32(S.VIRTIO_MMIO_DEVICE_ID) != S.VIRTIO_ID_BLOCK:
            raise DriverError("not a block device")
        self.w32(S.VIRTIO_MMIO_STATUS, 0)
        self.w32(S.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE)
        self.w32(S.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER)
        offered = 0
        for sel in (0, 1):
            self.w32(S.VIRTIO_MMIO_DEVICE_FEATURES_SEL, sel)
            offered |= self.r32(S.VIRTIO_MMIO_DEVICE_FEATURES) << (32 * sel)
        want = {
            S.VIRTIO_F_VERSION_1,
            S.VIRTIO_BLK_F_FLUSH,
            S.VIRTIO_BLK_F_DISCARD,
            S.VIRTIO_BLK_F_WRITE_ZEROES,
            S.VIRTIO_BLK_F_BLK_SIZE,
            S.VIRTIO_BLK_F_SEG_MAX,
            S.VIRTIO_BLK_F_SIZE_MAX,
            S.VIRTIO_BLK_F_TOPOLOGY,
            S.VIRTIO_BLK_F_RO,
            S.VIRTIO_BLK_F_CONFIG_WCE,
        }
        if self.event_idx:
            want.add(S.VIRTIO_F_EVENT_IDX)
        self.event_idx = False  # until negotiated (below)
        if self.indirect:
            want.add(S.VIRTIO_F_INDIRECT_DESC)
        if self.num_queues_wanted > 1:
            want.add(S.VIRTIO_BLK_F_MQ)
        if self.packed:
            want.add(S.VIRTIO_F_RING_PACKED)
        features = sum(1 << b for b in want) & offered
        if self.wanted_features is not None:
            features = self.wanted_features
        self.features = features
        self.event_idx = bool(features >> S.VIRTIO_F_EVENT_IDX & 1)
        self.indirect = bool(features >> S.VIRTIO_F_INDIRECT_DESC & 1)
        self.packed = bool(features >> S.VIRTIO_F_RING_PACKED & 1)
        for sel in (0, 1):
            self.w32(S.VIRTIO_MMIO_DRIVER_FEATURES_SEL, sel)
            self.w32(S.VIRTIO_MMIO_DRIVER_FEATURES, features >> (32 * sel) & 0xFFFFFFFF)
        self.w32(S.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK)
        if not self.status() & S.FEATURES_OK:
            self.w32(S.VIRTIO_MMIO_STATUS, self.status() | S.FAILED)
            raise DriverError(f"device refused features {features:#x}")
        nq = 1
        if self.num_queues_wanted > 1:
            nq = min(self.num_queues_wanted, self.config(0x22, 2))
        self.queues = []
        for i in range(nq):
            self.queues.append(self._setup_queue(i))
        if driver_ok:
            self.driver_ok()
        return self

    def driver_ok(self):
        self.w32(S.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK | S.DRIVER_OK)

    def _setup_queue(self, i):
        self.w32(S.VIRTIO_MMIO_QUEUE_SEL, i)
        if self.r32(S.VIRTIO_MMIO_QUEUE_READY):
            raise DriverError(f"queue {i} already ready")
        qmax = self.r32(S.VIRTIO_MMIO_QUEUE_NUM_MAX)
        if qmax == 0:
            raise DriverError(f"queue {i} does not exist")
        size = min(self.queue_size or qmax, qmax)
        dq = (PackedDriverQueue if self.packed else DriverQueue)(self, i, size)
        self.w32(S.VIRTIO_MMIO_QUEUE_NUM, size)
        for lo, addr in (
            (S.VIRTIO_MMIO_QUEUE_DESC_LOW, dq.desc_addr),
            (S.VIRTIO_MMIO_QUEUE_DRIVER_LOW, dq.avail_addr),
            (S.VIRTIO_MMIO_QUEUE_DEVICE_LOW, dq.used_addr),
        ):
            self.w32(lo, addr & 0xFFFFFFFF)
            self.w32(lo + 4, addr >> 32)
        self.w32(S.VIRTIO_MMIO_QUEUE_READY, 1)
        if not self.r32(S.VIRTIO_MMIO_QUEUE_READY):
            raise DriverError(f"device refused queue {i} of size {size}")
        return dq

    def reset(self):
        self.w32(S.VIRTIO_MMIO_STATUS, 0)

    # -- requests -------------------------------------------------------------------------------
    def _pick_queue(self, queue):
        if queue is not None:
            return self.queues[queue]
        q = self.queues[self._rr % len(self.queues)]
        self._rr += 1
        return q

    def submit(
        self,
        type_,
        sector=0,
        *,
        data=None,
        read_len=0,
        buffers=None,
        pieces=1,
        indirect=None,
        merge=False,
        queue=None,
        kick=True,
        copy_out=True,
    ):
        """Lay out and publish one request; returns its :class:`Request`.

        ``data``: bytes the device reads (OUT data, DISCARD/WRITE_ZEROES segments);
        ``read_len``: bytes the device writes before the status (IN, GET_ID);
        ``buffers``: instead of ``data``/``read_len``, pre-placed guest buffers
        ``[(addr, len)]`` (readable for OUT, writable for IN), used as they are;
        ``pieces``: cut the data into this many descriptors (byte boundaries, not sectors),
        or a list of piece lengths; ``indirect``: put the chain in an indirect table (default:
        whatever was negotiated); ``merge``: header and OUT data, or IN data and status, share
        one descriptor; ``kick``: notify now if the device asks for it (else call :meth:`kick`).
        """
        dq = self._pick_queue(queue)
        req = Request(type_, sector)
        req.queue = dq
        req.copy_out = copy_out
        alloc = self.allocator.alloc
        mem = self.mem
        writes_data = type_ in (S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_GET_ID)
        owned = []
        if buffers is not None:
            bufs = list(buffers)
            length = sum(n for _, n in bufs)
            req.copy_out = False
        else:
            length = read_len if writes_data else (len(data) if data is not None else 0)
            bufs = []
            if length:
                addr = alloc(length + 17)
                owned.append((addr, length + 17))
                if not writes_data:
                    mem.write(addr + 16 if merge else addr, data)
                bufs = [(addr + 16 if merge and not writes_data else addr, length)]
        req.read_len = length if writes_data else 0
        if isinstance(pieces, int):
            pieces = _even_pieces(length, pieces) if length else []
        if bufs and pieces and len(bufs) == 1 and len(pieces) > 1:
            a, _ = bufs[0]
            bufs = []
            for n in pieces:
                bufs.append((a, n))
                a += n
        req.bufs = bufs
        # descriptors: header (readable), data, status (writable)
        descs = []
        merged_hdr = merge and not writes_data and buffers is None and length
        merged_status = merge and writes_data and buffers is None and length
        if merged_hdr:
            hdr_addr = bufs[0][0] - 16
            descs.append((hdr_addr, 16 + bufs[0][1], 0))
            descs.extend((a, n, 0) for a, n in bufs[1:])
        else:
            descs.append(None)  # header at the per-head slot, filled in below
            wflag = VIRTQ_DESC_F_WRITE if writes_data else 0
            descs.extend((a, n, wflag) for a, n in (bufs if not merged_status else bufs[:-1]))
        if merged_status:
            a, n = bufs[-1]
            descs.append((a, n + 1, VIRTQ_DESC_F_WRITE))
            req.status_addr = a + n
        else:
            descs.append(None)  # status at the per-head slot
            req.status_addr = None
        use_indirect = self.indirect if indirect is None else indirect
        ndesc = 1 if use_indirect else len(descs)
        if dq.room() < ndesc:
            for a, n in owned:
                self.allocator.free(a, n)
            raise DriverError(f"queue {dq.index}: {ndesc} descriptors needed, {dq.room()} free")
        head = req.head = dq.take(req, ndesc)
        slot = dq.slot_addr + 32 * head
        if descs[0] is None:
            descs[0] = (slot, 16, 0)
            _pack_hdr(dq.slots, 32 * head, type_, 0, sector)
        else:
            _pack_hdr(mem.view(descs[0][0], 16), 0, type_, 0, sector)
        if descs[-1] is None:
            descs[-1] = (slot + 16, 1, VIRTQ_DESC_F_WRITE)
            req.status_addr = slot + 16
        req.status_view = mem.view(req.status_addr, 1)
        req.status_view[0] = 0xFF  # so a status never written shows
        if use_indirect:
            tlen = 16 * len(descs)
            table = alloc(tlen)
            owned.append((table, tlen))
            dq.write_table(mem.view(table, tlen), descs)
            descs = [(table, tlen, VIRTQ_DESC_F_INDIRECT)]
        req.owned = owned
        dq.inflight[head] = req
        dq.publish_chain(req, descs)
        if kick:
            self.kick(dq)
        return req

    def post(self, type_, sector, addr, length, queue=None):
        """The lean path for benchmarks: one pre-placed data buffer ``(addr, length)`` (writable
        for IN), a direct chain of header, data and status, published without a kick."""
        dq = self._pick_queue(queue)
        if dq.packed:
            return self.submit(
                type_, sector, buffers=[(addr, length)], queue=dq.index, kick=False, indirect=False
            )
        free = dq.free
        if len(free) < 3:
            raise DriverError(f"queue {dq.index}: 3 descriptors needed, {len(free)} free")
        head = free.pop()
        d1 = free.pop()
        d2 = free.pop()
        slot = dq.slot_addr + 32 * head
        desc = dq.desc
        reads = type_ == _T_IN
        _pack_desc(desc, 16 * head, slot, 16, VIRTQ_DESC_F_NEXT, d1)
        _pack_desc(
            desc,
            16 * d1,
            addr,
            length,
            (VIRTQ_DESC_F_WRITE if reads else 0) | VIRTQ_DESC_F_NEXT,
            d2,
        )
        _pack_desc(desc, 16 * d2, slot + 16, 1, VIRTQ_DESC_F_WRITE, 0)
        _pack_hdr(dq.slots, 32 * head, type_, 0, sector)
        status = dq.status_views[head]
        status[0] = 0xFF
        req = _new_request(Request)  # every field set here: no __init__ defaults to overwrite
        req.type = type_
        req.sector = sector
        req.queue = dq
        req.head = head
        req.descs = (head, d1, d2)
        req.table = None
        req.bufs = ((addr, length),)
        req.owned = ()
        req.done = False
        req.status = req.used_len = req.data = None
        req.read_len = length if reads else 0
        req.status_addr = slot + 16
        req.status_view = status
        req.copy_out = False
        dq.inflight[head] = req
        i = dq.avail_idx
        avail = dq.avail
        _pack16(avail, 4 + 2 * (i & (dq.size - 1)), head)
        dq.avail_idx = i = (i + 1) & 0xFFFF
        _pack16(avail, 2, i)  # 2.7.13: ring entry before the index
        return req

    def kick(self, dq=None):
        """Notify the queue(s) if the device's suppression state asks for it (2.7.10)."""
        for q in self.queues if dq is None else [dq]:
            if q.needs_kick():
                self.mmio.write(S.VIRTIO_MMIO_QUEUE_NOTIFY, 4, q.index)

    def notify(self, queue=0):
        """Notify unconditionally (hostile tests)."""
        self.mmio.write(S.VIRTIO_MMIO_QUEUE_NOTIFY, 4, queue)

    # -- completions ----------------------------------------------------------------------------
    def reap(self):
        """Collect every published completion; returns the requests completed now."""
        done = []
        mem = self.mem
        free = self.allocator.free

        def finish(req, length):
            req.used_len = length
            req.status = req.status_view[0]
            if req.read_len and req.copy_out:
                req.data = b"".join(mem.view(a, n) for a, n in req.bufs)
            if req.owned:
                for a, n in req.owned:
                    free(a, n)
            req.done = True
            done.append(req)

        for dq in self.queues:
            dq.reap_into(finish)
        return done

    def in_flight(self):
        return sum(len(q.inflight) for q in self.queues)

    def _idle(self, deadline):
        """Between two reaps: wait for an interrupt, or (polling) for the device to have
        completions, publishing them if it delivers by poll. False once ``deadline`` passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        dev = getattr(self.mmio, "device", None)
        if getattr(dev, "deliver", "callback") == "poll":  # the emulator's loop: wait, then publish
            if not dev.poll():
                select.select([dev.fileno()], [], [], min(left, 1.0))
                dev.poll()
            return True
        if self.uses_interrupts:
            return self._irq.wait(left)
        time.sleep(0)  # a polling guest spins on the used ring; let the completing threads run
        return True

    def wait(self, reqs=None, timeout=WAIT_TIMEOUT):
        """Reap until every request in ``reqs`` (default: all in flight) is done: on interrupt,
        or polling the used ring with ``interrupts=False``."""
        irq = self._irq
        deadline = time.monotonic() + timeout
        while True:
            irq.clear()
            self.reap()
            if reqs is None:
                if not self.in_flight():
                    return
            elif all(r.done for r in reqs):
                return
            if not self._idle(deadline):
                raise DriverError("timed out waiting for completions")

    def wait_any(self, timeout=WAIT_TIMEOUT):
        """Reap at least one completion (or return at once if some are already published)."""
        irq = self._irq
        deadline = time.monotonic() + timeout
        while True:
            irq.clear()
            done = self.reap()
            if done or not self.in_flight():
                return done
            if not self._idle(deadline):
                raise DriverError("timed out waiting for completions")

    # -- synchronous helpers ----------------------------------------------------------------------
    def _run(self, type_, sector=0, **kw):
        req = self.submit(type_, sector, **kw)
        self.wait([req])
        return req

    def read(self, sector, nbytes, **kw):
        """IN: returns ``(status, data)``."""
        req = self._run(S.VIRTIO_BLK_T_IN, sector, read_len=nbytes, **kw)
        return req.status, req.data

    def write(self, sector, data, **kw):
        return self._run(S.VIRTIO_BLK_T_OUT, sector, data=data, **kw).status

    def flush(self, **kw):
        return self._run(S.VIRTIO_BLK_T_FLUSH, 0, **kw).status

    def get_id(self, **kw):
        req = self._run(S.VIRTIO_BLK_T_GET_ID, 0, read_len=S.VIRTIO_BLK_ID_BYTES, **kw)
        return req.status, req.data

    def discard(self, segments, **kw):
        """``segments``: ``[(sector, num_sectors, flags)]``."""
        return self._run(S.VIRTIO_BLK_T_DISCARD, 0, data=encode_segments(segments), **kw).status

    def write_zeroes(self, segments, **kw):
        return self._run(
            S.VIRTIO_BLK_T_WRITE_ZEROES, 0, data=encode_segments(segments), **kw
        ).status


def _int_in(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def encode_segments(segments):
    """``[(sector, num_sectors, flags)]`` as ``struct virtio_blk_discard_write_zeroes`` bytes."""
    return b"".join(S.virtio_blk_discard_write_zeroes.pack(*s) for s in segments)


def _even_pieces(length, count):
    count = max(1, min(count, length))
    step = length // count
    pieces = [step] * count
    pieces[-1] += length - step * count
    return pieces

"""vhost-user-blk back-end: decoded vhost-user requests -> the one ``VirtioBlk`` device model.

Theory of operation
-------------------
vhost-user has no device status register: the front-end (QEMU) runs the virtio handshake with
the guest itself and tells the back-end only its outcome - the acked feature word
(SET_FEATURES), where guest memory is (SET_MEM_TABLE / ADD_MEM_REG), and, per ring, its size,
its next avail index, its addresses and its kick / call eventfds. This module replays that onto a
``VirtioBlk``: when the first ring becomes runnable it walks the device through ACKNOWLEDGE ->
DRIVER -> features -> FEATURES_OK -> DRIVER_OK with the acked virtio bits, then resolves the ring
in guest memory and starts it at the front-end's base index; when the last ring is stopped
(GET_VRING_BASE) it resets the device, so the next start (Linux after SeaBIOS) may negotiate a
different feature set on the same connection.

Memory: each region's fd is mapped (by the server's ``map_region``) and placed at its
guest-physical address in a fresh ``GuestMemory``; ring addresses arrive as *front-end virtual*
addresses and are translated through the regions' ``uva``. A re-sent table (QEMU sends it twice
while SeaBIOS runs) replaces the device's memory and re-resolves the running rings' views in
place, keeping their indices. Old mappings are never unmapped by hand: requests in flight hold
views of them, and a mapping goes away when the last view does.

A memory table is checked before anything is mapped (``check_regions``): no region of size 0, no
range (guest-physical, front-end virtual, or offset in the fd) that wraps 2^64, no two regions
overlapping in guest-physical or front-end virtual space, at most ``MAX_MEM_SLOTS`` regions. The
server's ``map_region`` then refuses a backing that could shrink under us (see
``vblock.vhost_user.server``). Every refusal is a failed reply; the table in use stays.

Threads: every request here runs on the server's loop thread, which is also the only thread that
reads kick eventfds and calls ``VirtioBlk.notify`` - so ring setup never races ring processing.
Completions arrive on the block layer's threads and signal the ring's call eventfd through
``_used_irq`` (under a per-ring lock, so a call fd being replaced is never written after close).

Stopping a ring (GET_VRING_BASE, disconnect) waits until every request taken from it has completed
and been published, then reads back its next avail index: after the reply, nothing of ours touches
that ring's memory.

Memory ordering with the guest's vCPUs: the guest runs on other host threads (QEMU's TCG or KVM
vCPUs) while this process reads and writes the rings, so the split queue's four ordering points
(``vblock.virtio.queue``: acquire after reading avail idx; release before publishing used idx; full
fences before reading used_event and before re-checking avail idx after re-enabling
notifications) must be real CPU fences, not the GIL. ``install_fences`` installs the virtio
accelerator's (C11 ``atomic_thread_fence``) there, through ``queue.use_native_fences``.
"""

from __future__ import annotations

import logging
import os
import threading

from vblock.vhost_user import protocol as P
from vblock.virtio import GuestMemory, VirtioBlk
from vblock.virtio import queue as _queue
from vblock.virtio.chain import RingError
from vblock.virtio.spec import (
    ACKNOWLEDGE,
    DRIVER,
    DRIVER_OK,
    FEATURES_OK,
    VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET,
    VIRTIO_BLK_F_CONFIG_WCE,
    VIRTIO_F_RING_PACKED,
    avail_ring_bytes,
    desc_table_bytes,
    used_ring_bytes,
)

__all__ = ["VhostUserBlk", "Refused", "check_regions", "install_fences", "PROTOCOL_FEATURES"]

_log = logging.getLogger(__name__)

PROTOCOL_FEATURES = (
    1 << P.PROTOCOL_F_MQ
    | 1 << P.PROTOCOL_F_REPLY_ACK
    | 1 << P.PROTOCOL_F_CONFIG
    | 1 << P.PROTOCOL_F_CONFIGURE_MEM_SLOTS
)
MAX_MEM_SLOTS = 32
QUEUE_SIZE_MAX = 1024  # QEMU's vhost-user-blk accepts queue-size up to 1024
_VHOST_BITS = 1 << P.VHOST_USER_F_PROTOCOL_FEATURES | 1 << P.VHOST_F_LOG_ALL
# Packed rings carry a wrap counter in GET/SET_VRING_BASE and other ring addresses: not served here yet.
_NOT_OVER_VHOST_USER = 1 << VIRTIO_F_RING_PACKED
STOP_TIMEOUT = 60.0  # seconds to wait for a stopped ring's requests before giving up on them


def install_fences():
    """Make the split queue's ordering points real CPU fences (see the module docstring)."""
    _queue.use_native_fences()


class Refused(Exception):
    """The back-end cannot do what a request asks; the front-end gets a failed ack (or nothing)."""


class _CountingImage:
    """The image as the device sees it, counting flushes (``vblock serve`` reports them on exit).
    Everything else is the image's own bound method, so the hot path gains no frame."""

    def __init__(self, img):
        self._img = img
        self.submit_read = img.submit_read
        self.submit_write = img.submit_write
        self.submit_discard = img.submit_discard
        self.submit_write_zeroes = img.submit_write_zeroes
        self.read_only = img.read_only
        self.path = img.path
        self.flushes = 0

    @property
    def size(self):
        return self._img.size

    def submit_flush(self):
        self.flushes += 1  # one thread (the loop thread) submits flushes
        return self._img.submit_flush()

    def flush(self):
        """A host-side flush (on disconnect), not counted as the guest's."""
        self._img.flush()


class _RingIO:
    """Per-ring fds owned by the back-end."""

    __slots__ = ("kick", "call", "err", "lock", "running")

    def __init__(self):
        self.kick = self.call = self.err = None
        self.lock = threading.Lock()
        self.running = False


class VhostUserBlk:
    """One vhost-user-blk device over ``img`` for the life of the server (many connections).

    ``host`` is the server's side of the I/O (``vblock.vhost_user.server``): ``map_region(fd,
    offset, size) -> buffer``, ``signal(fd)`` (never blocks), ``check_kick(fd)``,
    ``watch_kick(index, fd)``, ``unwatch_kick(index)``; the last three raise ``Refused`` for an
    fd that cannot be watched.
    """

    def __init__(self, img, host, num_queues=1, serial="vblock0", read_only=None, writeback=True):
        install_fences()
        self.image = _CountingImage(img)
        self.host = host
        self.writeback = writeback
        self.device = VirtioBlk(
            self.image,
            _no_memory(),
            num_queues=num_queues,
            queue_size_max=QUEUE_SIZE_MAX,
            serial=serial,
            read_only=read_only,
        )
        self.device.attach(self._used_irq, self._config_irq)
        self.num_queues = num_queues
        self.rings = [_RingIO() for _ in range(num_queues)]
        self.regions = []  # [(MemRegion, buffer)]
        self.session = None
        self.kicks = [0] * num_queues  # notifications served per ring (reported on exit)

    def new_connection(self):
        """A fresh protocol ``Connection`` for a newly accepted front-end."""
        conn = P.Connection(
            self.num_queues, self.device.device_features & ~_NOT_OVER_VHOST_USER, PROTOCOL_FEATURES
        )
        self.session = conn.session
        return conn

    # -- dispatch ---------------------------------------------------------------------------------
    def handle(self, req):
        """Carry out ``req`` (already checked by the session). Returns the value a ``GET_*``
        request answers with, else None. Raises ``Refused``; the received fds are ours."""
        if not req.known:
            _close(req.fds)
            raise Refused(f"request {req.code} is not implemented")
        fn = getattr(self, "_on_" + req.code.name.lower(), None)
        if fn is None:
            _close(req.fds)
            raise Refused(f"{req.code.name} is not implemented")
        return fn(req)

    # -- negotiation ------------------------------------------------------------------------------
    def _on_get_features(self, req):
        return self.session.device_features

    def _on_set_features(self, req):
        virtio = req.value & ~_VHOST_BITS
        dev = self.device
        if dev.status & FEATURES_OK and dev.driver_features != virtio:
            if any(r.running for r in self.rings):
                _log.warning(
                    "vhost-user: SET_FEATURES %#x while rings run; kept %#x",
                    virtio,
                    dev.driver_features,
                )
            else:
                dev.reset()

    def _on_get_protocol_features(self, req):
        return PROTOCOL_FEATURES

    def _on_set_protocol_features(self, req):
        pass

    def _on_get_queue_num(self, req):
        return self.num_queues

    def _on_get_max_mem_slots(self, req):
        return MAX_MEM_SLOTS

    def _on_set_owner(self, req):
        pass

    def _on_reset_owner(self, req):
        self.stop_all()

    _on_reset_device = _on_reset_owner

    def _on_set_backend_req_fd(self, req):
        _close(req.fds)  # not offered (no PROTOCOL_F_BACKEND_REQ); accept and drop
        raise Refused("SET_BACKEND_REQ_FD: backend requests not supported")

    # -- memory -----------------------------------------------------------------------------------
    def _map(self, region, fd):
        """Map ``region`` from ``fd`` (closed here, mapped or not)."""
        try:
            return self.host.map_region(fd, region.mmap_offset, region.size)
        except (OSError, ValueError, OverflowError) as exc:
            raise Refused(
                f"cannot map region gpa={region.gpa:#x} size={region.size:#x}: {exc}"
            ) from None
        finally:
            os.close(fd)

    def _on_set_mem_table(self, req):
        fds = list(req.fds)
        new = []
        try:
            check_regions(req.value)
            for region in req.value:
                new.append((region, self._map(region, fds.pop(0))))
        finally:
            _close(fds)
        self._set_regions(new)

    def _on_add_mem_reg(self, req):
        region = req.value
        try:
            check_regions([g for g, _ in self.regions] + [region])
        except Refused:
            _close(req.fds)
            raise
        buf = self._map(region, req.fds[0])
        self._set_regions(self.regions + [(region, buf)])

    def _on_rem_mem_reg(self, req):
        _close(req.fds)
        r = req.value
        keep = [(g, b) for g, b in self.regions if not (g.gpa == r.gpa and g.size == r.size)]
        if len(keep) == len(self.regions):
            raise Refused(f"REM_MEM_REG: no region at gpa={r.gpa:#x} size={r.size:#x}")
        self._set_regions(keep)

    def _set_regions(self, regions):
        try:
            mem = GuestMemory([(g.gpa, b) for g, b in regions]) if regions else _no_memory()
        except ValueError as exc:
            raise Refused(f"memory table refused: {exc}") from None
        self.regions = regions
        for i in range(self.num_queues):  # a ring the new table does not hold cannot go on
            q = self.device.queue(i)
            problem = q.check(mem) if q.ready else None
            if problem is not None:
                _log.error("vhost-user: ring %d not in the new memory table: %s", i, problem)
                self._stop(i)
                self._signal_err(i)
        self.device.set_memory(mem)  # running rings keep their indices; their views move
        self._sync()

    def uva_to_gpa(self, addr, length):
        for g, _ in self.regions:
            gpa = g.uva_to_gpa(addr, length)
            if gpa is not None:
                return gpa
        return None

    # -- rings ------------------------------------------------------------------------------------
    def _on_set_vring_num(self, req):
        pass  # recorded by the session; applied when the ring starts

    _on_set_vring_base = _on_set_vring_addr = _on_set_vring_num

    def _on_set_vring_kick(self, req):
        index = req.value & P.VRING_IDX_MASK
        rio = self.rings[index]
        if req.fds:
            try:
                self.host.check_kick(req.fds[0])  # an fd that cannot be watched: refused, old kept
            except Refused:
                _close(req.fds)
                raise
        if rio.running:
            self.host.unwatch_kick(index)
        _close([rio.kick] if rio.kick is not None else [])
        rio.kick = req.fds[0] if req.fds else None
        if rio.running and rio.kick is not None:
            self.host.watch_kick(index, rio.kick)
            self.kick(index)
        self._sync()

    def _on_set_vring_call(self, req):
        index = req.value & P.VRING_IDX_MASK
        rio = self.rings[index]
        with rio.lock:
            old, rio.call = rio.call, (req.fds[0] if req.fds else None)
        _close([old] if old is not None else [])
        if rio.running and rio.call is not None:
            self.host.signal(rio.call)  # a completion may have been signalled on the old fd

    def _on_set_vring_err(self, req):
        index = req.value & P.VRING_IDX_MASK
        rio = self.rings[index]
        old, rio.err = rio.err, (req.fds[0] if req.fds else None)
        _close([old] if old is not None else [])

    def _on_set_vring_enable(self, req):
        self._sync()

    def _on_get_vring_base(self, req):
        index, _ = req.value
        return index, self._stop(index)

    def _sync(self):
        """Start every ring that became runnable, pause every one that stopped being so."""
        for ring, rio in zip(self.session.rings, self.rings):
            want = ring.runnable and rio.kick is not None and bool(self.regions)
            if want and not rio.running:
                self._start(ring, rio)
            elif rio.running and not want:
                self.host.unwatch_kick(ring.index)
                rio.running = False

    def _start(self, ring, rio):
        dev = self.device
        i = ring.index
        try:
            self._device_up()
            a = ring.addr
            if a is None:
                raise Refused(f"ring {i} started without SET_VRING_ADDR")
            size = ring.num
            q = dev.queue(i)
            if q.ready:  # re-enabled after SET_VRING_ENABLE 0: the ring kept its state
                rio.running = True
                self.host.watch_kick(i, rio.kick)
                self.kick(i)
                return
            desc = self.uva_to_gpa(a.desc, desc_table_bytes(size))
            avail = self.uva_to_gpa(a.avail, avail_ring_bytes(size))
            used = self.uva_to_gpa(a.used, used_ring_bytes(size))
            if None in (desc, avail, used):
                raise Refused(f"ring {i} addresses {a} are not inside the memory table")
            q.size = size
            q.desc_addr, q.driver_addr, q.device_addr = desc, avail, used
            dev.set_queue_ready(i, True)
            q.restore(ring.base)  # next avail from SET_VRING_BASE, next used from the used ring
        except (Refused, RingError) as exc:
            _log.error("vhost-user: cannot start ring %d: %s", i, exc)
            self._signal_err(i)
            return
        rio.running = True
        self.host.watch_kick(i, rio.kick)
        self.kick(i)

    def _device_up(self):
        """Walk the device to DRIVER_OK with the session's acked virtio features (3.1.1)."""
        dev = self.device
        if dev.status & DRIVER_OK:
            return
        dev.reset()
        features = self.session.features & ~_VHOST_BITS
        dev.set_status(ACKNOWLEDGE)
        dev.set_status(ACKNOWLEDGE | DRIVER)
        dev.set_driver_features(features)
        dev.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        if not dev.status & FEATURES_OK:
            raise Refused(f"device refused features {features:#x}")
        if not self.writeback and features >> VIRTIO_BLK_F_CONFIG_WCE & 1:
            dev.write_config(VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET, 1, 0)
        dev.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK)
        _log.info("vhost-user: device up with features %#x", features)

    def kick(self, index):
        """An available-buffer notification for ring ``index`` (the loop thread)."""
        self.kicks[index] += 1
        self.device.notify(index)

    def kick_lost(self, index, why):
        """Ring ``index``'s kick fd can no longer be read (end of file, an error): the server has
        stopped watching it, so the ring gets no notifications until a new SET_VRING_KICK. The
        front-end hears of it on the ring's err fd."""
        _log.error("vhost-user: ring %d kick fd %s; the ring waits for a new kick fd", index, why)
        self._signal_err(index)

    def _stop(self, index):
        """Stop ring ``index``: no new requests, wait for those in flight, publish them; returns
        the next avail index. Resets the device once no ring runs."""
        rio = self.rings[index]
        if rio.running:
            self.host.unwatch_kick(index)
            rio.running = False
        dev = self.device
        q = dev.queue(index)
        base = q.next_avail if q.ready else self.session.rings[index].base
        if q.ready:
            if not dev.wait_idle(index, STOP_TIMEOUT):
                _log.error(
                    "vhost-user: ring %d still has requests in flight after %.0f s",
                    index,
                    STOP_TIMEOUT,
                )
            dev.set_queue_ready(index, False)
        _close([rio.kick] if rio.kick is not None else [])
        rio.kick = None
        _log.info("vhost-user: ring %d stopped at avail index %d", index, base)
        if not any(r.running for r in self.rings) and not any(
            dev.queue(i).ready for i in range(self.num_queues)
        ):
            dev.reset()
        return base

    def stop_all(self):
        for i in range(self.num_queues):
            self._stop(i)
        self.device.reset()

    # -- config space ---------------------------------------------------------------------------
    def _on_get_config(self, req):
        """Bytes of the config space: ``struct virtio_blk_config``, read as zeros past its end up to
        ``CONFIG_SPACE_MAX`` (a front-end built for a longer struct); a range past that is
        refused, so no allocation follows an offset the front-end chose."""
        c = req.value
        limit = P.CONFIG_SPACE_MAX
        if c.offset > limit or c.size > limit - c.offset:
            raise Refused(
                f"GET_CONFIG of {c.size} bytes at {c.offset:#x} is outside the config space"
            )
        cfg = bytearray(self.device.config_bytes())
        if not self.device.status & FEATURES_OK:
            cfg[VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET] = 1 if self.writeback else 0
        data = bytes(cfg[c.offset : c.offset + c.size])
        return P.ConfigSpace(c.offset, c.size, c.flags, data + bytes(c.size - len(data)))

    def _on_set_config(self, req):
        c = req.value
        if c.offset == VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET and c.size == 1:
            if self.device.status & FEATURES_OK:
                try:
                    self.device.write_config(c.offset, 1, c.data[0])
                except Exception as exc:
                    raise Refused(str(exc)) from None
            self.writeback = bool(c.data[0] & 1)
            return
        raise Refused(f"SET_CONFIG of {c.size} bytes at {c.offset:#x}: only writeback is writable")

    # -- interrupts -----------------------------------------------------------------------------
    def _used_irq(self, index):
        rio = self.rings[index]
        with rio.lock:
            if rio.call is not None:
                self.host.signal(rio.call)

    def _config_irq(self):
        # No back-end request channel is offered, so a config change cannot be sent; the one
        # config interrupt that matters, DEVICE_NEEDS_RESET, goes out on the rings' err fds.
        for i in range(self.num_queues):
            self._signal_err(i)

    def _signal_err(self, index):
        fd = self.rings[index].err
        if fd is not None:
            self.host.signal(fd)

    # -- connection end ---------------------------------------------------------------------------
    def disconnect(self):
        """The front-end went away: finish in-flight requests, flush, forget memory and fds."""
        self.stop_all()
        for rio in self.rings:
            with rio.lock:
                fds = [fd for fd in (rio.kick, rio.call, rio.err) if fd is not None]
                rio.kick = rio.call = rio.err = None
            _close(fds)
        self.regions = []
        self.device.set_memory(_no_memory())
        self.session = None
        if not self.image.read_only:
            self.image.flush()

    @property
    def flushes(self):
        return self.image.flushes


def check_regions(regions):
    """Raise ``Refused`` unless ``regions`` (``MemRegion``s) form a usable memory table: at most
    ``MAX_MEM_SLOTS``, none of size 0, no range that wraps 2^64 (guest-physical, front-end
    virtual, or ``mmap_offset + size`` in the fd), and no two overlapping in guest-physical or in
    front-end virtual addresses."""
    if len(regions) > MAX_MEM_SLOTS:
        raise Refused(f"memory table of {len(regions)} regions, at most {MAX_MEM_SLOTS}")
    for r in regions:
        where = f"region gpa={r.gpa:#x} size={r.size:#x} uva={r.uva:#x} offset={r.mmap_offset:#x}"
        if r.size == 0:
            raise Refused(f"{where}: size 0")
        for name, start in (
            ("guest-physical", r.gpa),
            ("front-end virtual", r.uva),
            ("file", r.mmap_offset),
        ):
            if start + r.size > _U64_LIMIT:
                raise Refused(f"{where}: {name} range wraps 2^64")
    for name, key in (("guest-physical", lambda r: r.gpa), ("front-end virtual", lambda r: r.uva)):
        spans = sorted((key(r), key(r) + r.size) for r in regions)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise Refused(f"memory regions overlap at {name} address {start:#x}")


_U64_LIMIT = 1 << 64


def _no_memory():
    """Before the first memory table: a single page far away, so no ring can resolve into it."""
    return GuestMemory([(1 << 62, bytearray(4096))])


def _close(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

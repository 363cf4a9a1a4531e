"""VirtioBlk and VirtioMmio: status machine, features, config space, queues, completion order,
batching, suppression, fairness, reset with requests in flight, backend failures."""

from __future__ import annotations

import errno
import itertools
import threading

import pytest

from tests.virtio.virtio_guest import Guest
from tests.virtio.virtio_helpers import FakeImage, Stack
from vblock.errors import UnsupportedError
from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
from vblock.virtio import spec as S
from vblock.virtio.blk import StatusError
from vblock.virtio.chain import RingError

A, D, F, OKB = S.ACKNOWLEDGE, S.DRIVER, S.FEATURES_OK, S.DRIVER_OK
IN, OUT = S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_OUT
W = S.VIRTQ_DESC_F_WRITE
CHAIN = [0, A, A | D, A | D | F, A | D | F | OKB]


def _dev(**kw):
    return VirtioBlk(FakeImage(), GuestMemory.anonymous(1 << 16), **kw)


# -- status ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("frm,to", list(itertools.product(range(len(CHAIN)), range(len(CHAIN)))))
def test_status_machine_every_edge(frm, to):
    """From each state of the init sequence, only the next step (or the same value, or 0 = reset)
    is accepted; anything else raises StatusError and leaves the status as it was."""
    dev = _dev()
    for value in CHAIN[1 : frm + 1]:
        if value == A | D | F:
            dev.set_driver_features(1 << S.VIRTIO_F_VERSION_1)
        dev.set_status(value)
    assert dev.status == CHAIN[frm]
    if to == frm + 1 and CHAIN[to] & F and not CHAIN[frm] & F:
        dev.set_driver_features(1 << S.VIRTIO_F_VERSION_1)
    if to in (frm, frm + 1) or to == 0:
        dev.set_status(CHAIN[to])
        assert dev.status == CHAIN[to]
    else:
        with pytest.raises(StatusError):
            dev.set_status(CHAIN[to])
        assert dev.status == CHAIN[frm]


def test_failed_may_be_set_any_time_and_stops_service():
    st = Stack(FakeImage())
    st.mmio.write(S.VIRTIO_MMIO_STATUS, 4, st.drv.status() | S.FAILED)
    assert st.dev.status & S.FAILED
    req = st.drv.submit(OUT, 0, data=b"x" * 512)
    assert not req.done and st.img.ops == []


def test_features_ok_refused_without_version_1_or_with_unoffered_bits():
    for feats in (
        1 << S.VIRTIO_BLK_F_FLUSH,
        (1 << S.VIRTIO_F_VERSION_1) | (1 << S.VIRTIO_F_IN_ORDER),
    ):
        dev = _dev()
        dev.set_status(A)
        dev.set_status(A | D)
        dev.set_driver_features(feats)
        dev.set_status(A | D | F)
        assert dev.status == A | D  # 3.1.1: FEATURES_OK reads back clear


def test_driver_features_only_between_driver_and_features_ok():
    dev = _dev()
    with pytest.raises(StatusError):
        dev.set_driver_features(1 << S.VIRTIO_F_VERSION_1)


def test_offered_features():
    dev = _dev()
    offered = {b for b in range(64) if dev.device_features >> b & 1}
    assert offered == {
        S.VIRTIO_F_VERSION_1,
        S.VIRTIO_F_INDIRECT_DESC,
        S.VIRTIO_F_EVENT_IDX,
        S.VIRTIO_F_RING_PACKED,
        S.VIRTIO_BLK_F_SIZE_MAX,
        S.VIRTIO_BLK_F_SEG_MAX,
        S.VIRTIO_BLK_F_BLK_SIZE,
        S.VIRTIO_BLK_F_TOPOLOGY,
        S.VIRTIO_BLK_F_FLUSH,
        S.VIRTIO_BLK_F_CONFIG_WCE,
        S.VIRTIO_BLK_F_MQ,
        S.VIRTIO_BLK_F_DISCARD,
        S.VIRTIO_BLK_F_WRITE_ZEROES,
    }
    ro = VirtioBlk(FakeImage(read_only=True), GuestMemory.anonymous(4096))
    assert ro.read_only and ro.device_features >> S.VIRTIO_BLK_F_RO & 1
    with pytest.raises(ValueError):
        VirtioBlk(FakeImage(read_only=True), GuestMemory.anonymous(4096), read_only=False)


def test_no_buffers_used_before_driver_ok():
    st = Stack(FakeImage(), start=False)
    drv = st.drv.start(driver_ok=False)
    req = drv.submit(OUT, 0, data=b"y" * 512)
    drv.notify(0)
    assert st.img.ops == [] and drv.queues[0].used_idx() == 0
    drv.driver_ok()  # buffers already made available are served now
    drv.wait([req])
    assert req.status == 0 and st.img.data[:512] == b"y" * 512


# -- config space ----------------------------------------------------------------------------------
def test_config_space_fields():
    st = Stack(FakeImage(size=3 << 20), num_queues=4, queue_size_max=128)
    drv = st.drv
    assert drv.config(0, 8) == (3 << 20) // 512  # capacity
    assert drv.config(0x0C, 4) == 126  # seg_max
    assert drv.config(0x14, 4) == 512  # blk_size
    assert drv.config(0x18, 1) == 3  # physical_block_exp: 4 KiB
    assert drv.config(0x20, 1) == 1  # writeback (FLUSH negotiated)
    assert drv.config(0x21, 1) == 0  # unused0
    assert drv.config(0x22, 2) == 4  # num_queues
    assert drv.config(0x28, 4) == 32 and drv.config(0x34, 4) == 32  # max_*_seg
    assert drv.config(0x38, 1) == 1  # write_zeroes_may_unmap
    assert drv.config(0x39, 1) == 0 and drv.config(0x3A, 2) == 0  # unused1
    assert drv.config(96, 1) == 0 and drv.config(95, 2) == 0  # past the end
    assert len(st.dev.config_bytes()) == 96


def test_writeback_toggle_with_config_wce_controls_fua():
    st = Stack(FakeImage())
    assert st.drv.write(0, b"a" * 512) == 0
    st.mmio.write(S.VIRTIO_MMIO_CONFIG + 0x20, 1, 0)  # writethrough
    assert st.drv.config(0x20, 1) == 0
    assert st.drv.write(0, b"b" * 512) == 0
    assert [op[3] for op in st.img.ops if op[0] == "write"] == [False, True]
    st.mmio.write(S.VIRTIO_MMIO_CONFIG + 0x00, 8, 123)  # capacity is read-only: ignored
    assert st.drv.capacity == st.img.size // 512


def test_writethrough_without_flush_negotiated():
    """A driver that negotiates only VERSION_1 assumes writethrough (5.2.5.1): every write is
    made stable before it completes."""
    st = Stack(FakeImage(), features=1 << S.VIRTIO_F_VERSION_1)
    d = st.drv
    assert not d.event_idx and not d.indirect
    assert d.write(0, b"c" * 512) == 0
    assert st.img.ops[-1] == ("write", 0, 512, True)
    assert d.flush() == S.VIRTIO_BLK_S_UNSUPP  # FLUSH not negotiated
    assert d.discard([(0, 1, 0)]) == S.VIRTIO_BLK_S_UNSUPP
    assert d.write_zeroes([(0, 1, 0)]) == S.VIRTIO_BLK_S_UNSUPP


def test_capacity_change_moves_generation_and_interrupts():
    st = Stack(FakeImage(size=1 << 20))
    cap = st.drv.capacity
    assert st.drv.write(cap, b"z" * 512) == S.VIRTIO_BLK_S_IOERR
    gen = st.mmio.read(S.VIRTIO_MMIO_CONFIG_GENERATION, 4)
    st.img.size = 2 << 20
    st.img.data.extend(bytes(1 << 20))
    st.dev.update_capacity()
    assert st.mmio.read(S.VIRTIO_MMIO_CONFIG_GENERATION, 4) == gen + 1
    assert st.drv.config_interrupts == 1
    assert st.drv.capacity == (2 << 20) // 512
    assert st.drv.write(cap, b"z" * 512) == 0


# -- mmio registers -------------------------------------------------------------------------------
def test_mmio_identity_and_feature_selectors():
    dev = _dev(num_queues=2, queue_size_max=64)
    mmio = VirtioMmio(dev)
    r = lambda off: mmio.read(off, 4)  # noqa: E731
    assert (r(0), r(4), r(8), r(0xC)) == (0x74726976, 2, 2, S.MMIO_VENDOR_ID)
    words = []
    for sel in (0, 1, 2):
        mmio.write(S.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 4, sel)
        words.append(r(S.VIRTIO_MMIO_DEVICE_FEATURES))
    assert words[0] | words[1] << 32 == dev.device_features and words[2] == 0
    mmio.write(S.VIRTIO_MMIO_QUEUE_SEL, 4, 1)
    assert r(S.VIRTIO_MMIO_QUEUE_NUM_MAX) == 64
    mmio.write(S.VIRTIO_MMIO_QUEUE_SEL, 4, 2)
    assert r(S.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0 and r(S.VIRTIO_MMIO_QUEUE_READY) == 0
    assert r(S.VIRTIO_MMIO_SHM_LEN_LOW) == 0xFFFFFFFF
    assert mmio.read(0, 2) == 0  # registers are 32-bit only
    mmio.write(S.VIRTIO_MMIO_STATUS, 4, S.DRIVER_OK)  # illegal step: logged and ignored
    assert r(S.VIRTIO_MMIO_STATUS) == 0


def test_mmio_queue_registers_and_refusals():
    st = Stack(FakeImage(), start=False, queue_size=16)
    drv = st.drv
    drv.start()
    m = st.mmio
    m.write(S.VIRTIO_MMIO_QUEUE_SEL, 4, 0)
    q = st.dev.queue(0)
    assert m.read(S.VIRTIO_MMIO_QUEUE_NUM, 4) == 16 and m.read(S.VIRTIO_MMIO_QUEUE_READY, 4) == 1
    assert m.read(S.VIRTIO_MMIO_QUEUE_DESC_LOW, 4) == q.desc_addr
    m.write(S.VIRTIO_MMIO_QUEUE_NUM, 4, 8)  # written while ready: ignored (4.2.2.3)
    assert q.size == 16
    # a second queue without MQ negotiated is refused
    dev = VirtioBlk(FakeImage(), st.mem, num_queues=2)
    m2 = VirtioMmio(dev)
    for v in (A, A | D):
        m2.write(S.VIRTIO_MMIO_STATUS, 4, v)
    m2.write(S.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 4, 1)
    m2.write(S.VIRTIO_MMIO_DRIVER_FEATURES, 4, 1)
    m2.write(S.VIRTIO_MMIO_STATUS, 4, A | D | F)
    m2.write(S.VIRTIO_MMIO_QUEUE_SEL, 4, 1)
    m2.write(S.VIRTIO_MMIO_QUEUE_NUM, 4, 8)
    m2.write(S.VIRTIO_MMIO_QUEUE_READY, 4, 1)
    assert m2.read(S.VIRTIO_MMIO_QUEUE_READY, 4) == 0
    # sizes that are not a power of two, and rings outside memory, leave the queue not ready
    m2.write(S.VIRTIO_MMIO_QUEUE_SEL, 4, 0)
    m2.write(S.VIRTIO_MMIO_QUEUE_NUM, 4, 6)
    m2.write(S.VIRTIO_MMIO_QUEUE_READY, 4, 1)
    assert m2.read(S.VIRTIO_MMIO_QUEUE_READY, 4) == 0
    m2.write(S.VIRTIO_MMIO_QUEUE_NUM, 4, 8)
    m2.write(S.VIRTIO_MMIO_QUEUE_DESC_HIGH, 4, 1)  # 4 GiB: beyond guest memory
    m2.write(S.VIRTIO_MMIO_QUEUE_READY, 4, 1)
    assert m2.read(S.VIRTIO_MMIO_QUEUE_READY, 4) == 0


def test_interrupt_status_and_ack():
    st = Stack(FakeImage(), interrupts=False)
    calls = []
    st.mmio.interrupt = lambda: calls.append(st.mmio.read(S.VIRTIO_MMIO_INTERRUPT_STATUS, 4))
    req = st.drv.submit(OUT, 0, data=b"q" * 512)
    assert calls == [S.VIRTIO_MMIO_INT_VRING]
    st.dev.update_capacity()
    assert calls[-1] == S.VIRTIO_MMIO_INT_VRING | S.VIRTIO_MMIO_INT_CONFIG
    st.mmio.write(S.VIRTIO_MMIO_INTERRUPT_ACK, 4, S.VIRTIO_MMIO_INT_VRING)
    assert st.mmio.read(S.VIRTIO_MMIO_INTERRUPT_STATUS, 4) == S.VIRTIO_MMIO_INT_CONFIG
    st.drv.reap()
    assert req.done and req.status == 0


# -- requests -------------------------------------------------------------------------------------
def test_used_lengths_count_bytes_written():
    st = Stack(FakeImage())
    r = st.drv._run(IN, 0, read_len=4096, pieces=3)
    assert (r.status, r.used_len) == (0, 4097)
    r = st.drv._run(OUT, 0, data=b"w" * 1024)
    assert (r.status, r.used_len) == (0, 1)
    r = st.drv._run(S.VIRTIO_BLK_T_GET_ID, 0, read_len=64)
    assert (r.status, r.used_len, r.data[:8]) == (0, 21, b"vblock0\0")
    r = st.drv._run(IN, 1 << 40, read_len=512)
    assert (r.status, r.used_len) == (S.VIRTIO_BLK_S_IOERR, 1)


def test_serial_is_nul_padded_or_exactly_20_bytes():
    assert Stack(FakeImage(), serial="s").drv.get_id() == (0, b"s" + bytes(19))
    assert Stack(FakeImage(), serial="x" * 25).drv.get_id() == (0, b"x" * 20)


def test_multi_segment_discard_and_write_zeroes():
    st = Stack(FakeImage())
    st.img.data[:] = b"\x01" * len(st.img.data)
    assert st.drv.write_zeroes([(0, 2, 0), (16, 1, 1)]) == 0
    assert st.drv.discard([(32, 8, 0), (64, 8, 0)]) == 0
    assert st.img.ops == [
        ("write_zeroes", 0, 1024, False),
        ("write_zeroes", 8192, 512, True),
        ("discard", 16384, 4096, None),
        ("discard", 32768, 4096, None),
    ]
    assert st.img.data[:1024] == bytes(1024) and st.img.data[1024:1025] == b"\x01"
    assert st.drv.discard([(0, 1, 0)] * 33) == S.VIRTIO_BLK_S_IOERR  # more than max_discard_seg


@pytest.mark.parametrize(
    "exc,status",
    [
        (OSError(errno.EIO, "io"), S.VIRTIO_BLK_S_IOERR),
        (UnsupportedError("no"), S.VIRTIO_BLK_S_UNSUPP),
    ],
)
def test_backend_failures_become_status(exc, status):
    st = Stack(FakeImage())
    st.img.fail["write"] = exc
    assert st.drv.write(0, b"f" * 512) == status
    assert st.drv.write(0, b"f" * 512) == 0  # and the queue goes on


def test_backend_refusing_at_submit_is_ioerr():
    st = Stack(FakeImage())

    def boom(offset, buffers):
        raise ValueError("refused")

    st.img.submit_read = boom
    r = st.drv._run(IN, 0, read_len=512)
    assert (r.status, r.used_len) == (S.VIRTIO_BLK_S_IOERR, 1)


# -- completion order, batching, suppression ------------------------------------------------------
def test_completions_in_any_order_are_published_in_completion_order():
    st = Stack(FakeImage(defer=True), event_idx=False)
    drv = st.drv
    reqs = [drv.submit(OUT, 8 * i, data=bytes([i]) * 512, kick=False) for i in range(5)]
    drv.kick()
    assert len(st.img.pending) == 5 and st.dev.in_flight() == 5
    order = [3, 0, 4, 1, 2]
    st.img.complete(order)
    used = drv.queues[0].reap_raw()
    assert [h for h, _ in used] == [reqs[i].head for i in order]
    assert all(st.mem.read(reqs[i].status_addr, 1) == b"\0" for i in order)
    assert st.dev.in_flight() == 0


def test_one_used_index_update_and_one_interrupt_per_batch():
    st = Stack(FakeImage(), event_idx=False)
    drv = st.drv
    stores = []
    q = st.dev.queue(0)
    orig = type(q).publish_used
    type(q).publish_used = lambda self: (stores.append(self.next_used), orig(self))[1]
    try:
        for i in range(8):
            drv.submit(OUT, i, data=b"b" * 512, kick=False)
        drv.kick()
    finally:
        type(q).publish_used = orig
    assert stores == [8] and drv.interrupts == 1
    assert len(drv.reap()) == 8


def test_no_interrupt_flag_and_used_event_suppress_interrupts():
    st = Stack(FakeImage(), event_idx=False)
    st.drv.queues[0].set_avail_flags(S.VIRTQ_AVAIL_F_NO_INTERRUPT)
    st.drv.submit(OUT, 0, data=b"n" * 512)
    assert st.drv.interrupts == 0 and len(st.drv.reap()) == 1
    st = Stack(FakeImage(), event_idx=True)
    dq = st.drv.queues[0]
    dq.set_used_event(5)  # interrupt only when used idx passes 5
    for i in range(5):
        st.drv.submit(OUT, i, data=b"e" * 512)
        assert st.drv.interrupts == 0
    st.drv.submit(OUT, 5, data=b"e" * 512)
    assert st.drv.interrupts == 1


def test_avail_event_asks_for_a_kick_only_when_needed():
    st = Stack(FakeImage(), event_idx=True)
    drv, dq = st.drv, st.drv.queues[0]
    kicks = []
    orig = st.dev.notify
    st.dev.notify = lambda i: (kicks.append(i), orig(i))
    drv.submit(OUT, 0, data=b"k" * 512)
    assert kicks == [0] and dq.avail_event() == 1  # device wants a kick for the next one
    drv.submit(OUT, 1, data=b"k" * 512)
    assert kicks == [0, 0]


def test_bounded_turns_let_another_queue_in():
    """A guest that keeps refilling queue 0 during the drain cannot starve queue 1: after at most
    one turn (queue size chains) of queue 0, queue 1 is served."""
    st = Stack(FakeImage(), num_queues=2, queue_size=8, queue_size_max=8)
    g0, g1 = Guest(st, 0), Guest(st, 1)
    h0 = g0.chain(
        [(g0.header(OUT, 0), 16, 0), (g0.buf(512, b"0" * 512), 512, 0), (g0.status(), 1, W)]
    )
    h1 = g1.chain(
        [(g1.header(OUT, 1000), 16, 0), (g1.buf(512, b"1" * 512), 512, 0), (g1.status(), 1, W)]
    )
    orig = st.img.submit_write
    refills = []

    def write(offset, buffers, fua=False):
        if offset == 0 and len(refills) < 40:
            if not refills:
                g1.dq.push_head(h1)
                st.drv.notify(1)  # another vCPU's kick: queued, since this thread drains
            refills.append(1)
            g0.dq.push_head(h0)  # the busy guest re-posts at once
        return orig(offset, buffers, fua)

    st.img.submit_write = write
    g0.dq.push_head(h0)
    st.drv.notify(0)
    offsets = [op[1] for op in st.img.ops if op[0] == "write"]
    assert offsets.count(0) == 41 and offsets.count(1000 * 512) == 1
    assert offsets.index(1000 * 512) <= 8


# -- reset ----------------------------------------------------------------------------------------
def test_reset_with_requests_in_flight_drops_them_safely():
    st = Stack(FakeImage(defer=True))
    drv = st.drv
    reqs = [drv.submit(IN, 8 * i, read_len=512, kick=False) for i in range(3)]
    drv.kick()
    assert st.dev.in_flight() == 3
    used_before = st.mem.read(drv.queues[0].used_addr, S.used_ring_bytes(drv.queues[0].size))
    drv.reset()
    assert st.dev.status == 0 and st.mmio.interrupt_status == 0
    st.img.complete()  # late completions after reset
    assert (
        st.mem.read(drv.queues[0].used_addr, S.used_ring_bytes(drv.queues[0].size)) == used_before
    )
    assert all(st.mem.read(r.status_addr, 1) == b"\xff" for r in reqs)  # no status written
    st.img.defer = False
    drv.start()
    assert drv.write(0, b"r" * 512) == 0 and drv.read(0, 512) == (0, b"r" * 512)
    assert st.dev.in_flight() == 0


# -- hooks for transports that own memory and rings -------------------------------------------------
def test_wait_idle_follows_heads_back_to_the_used_ring():
    st = Stack(FakeImage(defer=True), num_queues=2)
    drv = st.drv
    drv.submit(OUT, 0, data=b"i" * 512, queue=1)
    assert st.dev.wait_idle(0, timeout=0) is True  # queue 0 has nothing taken
    assert st.dev.wait_idle(timeout=0) is False  # queue 1 has a head out
    done = threading.Thread(target=st.img.complete)
    done.start()
    assert st.dev.wait_idle(timeout=30) is True
    done.join()
    assert len(drv.reap()) == 1


def test_set_memory_rebinds_ready_rings_and_restore_continues_indices():
    st = Stack(FakeImage())
    drv = st.drv
    assert drv.write(0, b"m" * 512) == 0
    # a new mapping of the same guest RAM (vhost-user sends a new memory table)
    from vblock.virtio import GuestMemory as GM

    same = GM([(0, st.mem.regions[0][1])])
    st.dev.set_memory(same)
    assert st.dev.mem is same
    assert drv.write(1, b"n" * 512) == 0
    with pytest.raises(RingError):
        st.dev.set_memory(GM([(1 << 40, bytearray(4096))]))
    assert st.dev.mem is same
    q = st.dev.queue(0)
    q.restore(q.next_avail)  # next_used from the ring itself
    assert q.next_used == drv.queues[0].used_idx() == 2
    assert drv.read(1, 512) == (0, b"n" * 512)

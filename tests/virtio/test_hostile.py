"""Hostile guests, one named test each (Firecracker's ladder: one broken field per test).

Every test checks the documented outcome (status byte, used length 0 for an unanswerable frame,
or DEVICE_NEEDS_RESET), that no byte of guest memory outside the writable buffers the guest gave
changed (guard bytes surround every buffer, and all of guest memory is compared), that no
exception escaped, and that the queue then serves a good request where the spec allows.
"""

from __future__ import annotations

import pytest

from tests.virtio.virtio_guest import Guest, PackedGuest
from tests.virtio.virtio_helpers import FakeImage, Stack
from vblock.virtio import spec as S
from vblock.virtio.spec import VIRTQ_DESC_F_INDIRECT as IND
from vblock.virtio.spec import VIRTQ_DESC_F_WRITE as W

IN, OUT = S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_OUT
IOERR, UNSUPP, OK = S.VIRTIO_BLK_S_IOERR, S.VIRTIO_BLK_S_UNSUPP, S.VIRTIO_BLK_S_OK


@pytest.fixture
def guest():
    return Guest(Stack(FakeImage(), queue_size=8, queue_size_max=8, indirect=True))


def serves_next(g):
    """A good write and read-back on the same queue after the hostile request."""
    drv = g.drv
    assert drv.write(100, b"\x5a" * 1024) == OK
    assert drv.read(100, 1024) == (OK, b"\x5a" * 1024)


def unanswerable(g, head):
    """The frame cannot be answered: head back with used length 0, nothing written anywhere."""
    g.writable = []  # nothing may change, not even the status byte
    used, bad = g.run(head)
    assert used == [(head, 0)]
    assert bad == []
    assert not g.stack.dev.status & S.DEVICE_NEEDS_RESET
    serves_next(g)


def answered(g, head, status, status_addr, used_len=1):
    used, bad = g.run(head)
    assert used == [(head, used_len)]
    assert bad == []
    assert g.mem.read(status_addr, 1)[0] == status
    serves_next(g)


def write_request(g, nbytes=512, sector=0):
    return g.header(OUT, sector), g.buf(nbytes, b"\x11" * nbytes)


def test_descriptor_loop(guest):
    g = guest
    h, d = write_request(g)
    st = g.status()
    head = g.chain([(h, 16, 0, 1), (d, 512, 0, 2), (st, 1, W, 0)])  # 2 -> 0: a loop
    unanswerable(g, head)


def test_next_index_beyond_queue_size(guest):
    g = guest
    h, d = write_request(g)
    head = g.chain([(h, 16, 0, 1), (d, 512, 0, 8)])  # queue size 8: next 8 is out of range
    unanswerable(g, head)


def test_chain_longer_than_the_queue(guest):
    g = guest  # an indirect table of 9 entries (header, 7 data, status) on a queue of 8
    h = g.header(OUT, 0)
    data = [g.buf(512, b"\x22" * 512) for _ in range(7)]
    st = g.status()
    table = g.indirect_table([(h, 16, 0)] + [(a, 512, 0) for a in data] + [(st, 1, W)])  # 9 > 8
    head = g.chain([(table[0], table[1], IND)])
    unanswerable(g, head)
    assert g.stack.img.ops[-2:] == [
        ("write", 100 * 512, 1024, False),
        ("read", 100 * 512, 1024, None),
    ]


def test_chain_of_exactly_queue_size_is_legal(guest):
    g = guest
    h = g.header(OUT, 0)
    data = [g.buf(512, bytes([i]) * 512) for i in range(6)]
    st = g.status()
    head = g.chain([(h, 16, 0)] + [(a, 512, 0) for a in data] + [(st, 1, W)])  # 8 of 8
    used, bad = g.run(head)
    assert used == [(head, 1)] and bad == [] and g.mem.read(st, 1) == b"\0"
    assert bytes(g.stack.img.data[:3072]) == b"".join(bytes([i]) * 512 for i in range(6))


def test_nested_indirect(guest):
    g = guest
    h, d = write_request(g)
    st = g.status()
    inner = g.indirect_table([(d, 512, 0), (st, 1, W)])
    outer = g.indirect_table([(h, 16, 0), (inner[0], inner[1], IND)])
    head = g.chain([(outer[0], outer[1], IND)])
    unanswerable(g, head)


def test_indirect_with_next(guest):
    g = guest
    h, d = write_request(g)
    st = g.status()
    table = g.indirect_table([(h, 16, 0), (d, 512, 0), (st, 1, W)])
    head = g.chain([(table[0], table[1], IND, 1), (st, 1, W)])
    unanswerable(g, head)


def test_indirect_length_not_multiple_of_16(guest):
    g = guest
    h, d = write_request(g)
    st = g.status()
    table = g.indirect_table([(h, 16, 0), (d, 512, 0), (st, 1, W)])
    head = g.chain([(table[0], table[1] - 8, IND)])
    unanswerable(g, head)


def test_indirect_not_negotiated():
    g = Guest(Stack(FakeImage(), queue_size=8, indirect=False))
    h, d = write_request(g)
    st = g.status()
    table = g.indirect_table([(h, 16, 0), (d, 512, 0), (st, 1, W)])
    unanswerable(g, g.chain([(table[0], table[1], IND)]))


def test_zero_length_buffer(guest):
    g = guest
    h, d = write_request(g)
    st = g.status()
    head = g.chain([(h, 16, 0), (d, 0, 0), (st, 1, W)])
    unanswerable(g, head)


def answered_ioerr_in_status_only(g, head, st, run=None):
    """A buffer outside guest memory with a valid status byte: IOERR in that byte (used length 1),
    no data moved, and nothing else written - not even the in-memory data buffers."""
    g.writable = [(st, 1)]
    ops = len(g.stack.img.ops)
    used, bad = g.run(head) if run is None else run()
    assert used == [(head, 1)]
    assert bad == []
    assert g.mem.read(st, 1)[0] == IOERR
    assert g.stack.img.ops[ops:] == []
    assert not g.stack.dev.status & S.DEVICE_NEEDS_RESET
    serves_next(g)


def test_address_beyond_guest_memory(guest):
    g = guest
    h = g.header(IN, 0)
    st = g.status()
    head = g.chain([(h, 16, 0), (g.mem.size - 256, 512, W), (st, 1, W)])
    answered_ioerr_in_status_only(g, head, st)


def test_address_plus_length_wraps_2_64(guest):
    g = guest
    h = g.header(IN, 0)
    st = g.status()
    head = g.chain([(h, 16, 0), ((1 << 64) - 256, 512, W), (st, 1, W)])
    answered_ioerr_in_status_only(g, head, st)


def test_write_data_beyond_guest_memory(guest):
    g = guest
    h = g.header(OUT, 0)
    d = g.buf(512, b"\x11" * 512)
    st = g.status()
    head = g.chain([(h, 16, 0), (d, 512, 0), (g.mem.size - 8, 512, 0), (st, 1, W)])
    answered_ioerr_in_status_only(g, head, st)


def test_read_data_beyond_guest_memory_beside_a_good_piece(guest):
    g = guest
    h = g.header(IN, 0)
    d = g.buf(512, writable=False)  # in memory, yet the device must not fill it
    st = g.status()
    head = g.chain([(h, 16, 0), ((1 << 64) - 256, 512, W), (d, 512, W), (st, 1, W)])
    answered_ioerr_in_status_only(g, head, st)


def test_header_beyond_guest_memory(guest):
    g = guest
    d = g.buf(512)
    st = g.status()
    head = g.chain([(g.mem.size, 16, 0), (d, 512, W), (st, 1, W)])
    answered_ioerr_in_status_only(g, head, st)


def test_data_beyond_guest_memory_in_an_indirect_table(guest):
    g = guest
    h = g.header(IN, 0)
    st = g.status()
    table = g.indirect_table([(h, 16, 0), ((1 << 64) - 16, 512, W), (st, 1, W)])
    head = g.chain([(table[0], table[1], IND)])
    answered_ioerr_in_status_only(g, head, st)


def test_status_byte_beyond_guest_memory(guest):
    g = guest
    h = g.header(IN, 0)
    d = g.buf(512, writable=False)
    head = g.chain([(h, 16, 0), (d, 512, W), (g.mem.size, 1, W)])
    unanswerable(g, head)


def test_status_wrapping_2_64_after_data_beyond_guest_memory(guest):
    g = guest
    h = g.header(IN, 0)
    head = g.chain([(h, 16, 0), (g.mem.size - 256, 512, W), ((1 << 64) - 1, 2, W)])
    unanswerable(g, head)


def test_buffer_beyond_guest_memory_without_writable_buffers(guest):
    g = guest
    h, d = write_request(g)
    head = g.chain([(h, 16, 0), (g.mem.size + 4096, 512, 0)])
    unanswerable(g, head)


def test_buffer_beyond_guest_memory_in_an_otherwise_broken_chain(guest):
    g = guest
    h = g.header(IN, 0)
    st = g.status()
    head = g.chain(
        [(h, 16, 0), (g.mem.size, 512, W), (st, 1, W), (h, 16, 0)]
    )  # readable after writable
    unanswerable(g, head)


def test_readable_after_writable(guest):
    g = guest
    h, d = write_request(g)
    st = g.status()
    head = g.chain([(h, 16, 0), (st, 1, W), (d, 512, 0)])
    unanswerable(g, head)


def test_writable_header(guest):
    g = guest
    h = g.header(IN, 0, writable=True)
    d = g.buf(512, writable=True)
    st = g.status()
    head = g.chain([(h, 16, W), (d, 512, W), (st, 1, W)])
    before_hdr = g.mem.read(h, 16)
    answered(g, head, IOERR, st)
    assert g.mem.read(h, 16) == before_hdr and g.mem.read(d, 512) == b"\xa5" * 512


def test_read_only_status(guest):
    g = guest
    h, d = write_request(g)
    st = g.buf(1, b"\xff")
    head = g.chain([(h, 16, 0), (d, 512, 0), (st, 1, 0)])
    unanswerable(g, head)
    assert g.stack.img.data[:512] != b"\x11" * 512


def test_missing_status_byte(guest):
    g = guest
    h, d = write_request(g)
    head = g.chain([(h, 16, 0), (d, 512, 0)])
    unanswerable(g, head)


def test_in_data_not_multiple_of_512(guest):
    g = guest
    h = g.header(IN, 0)
    d = g.buf(511, writable=True)
    st = g.status()
    answered(g, g.chain([(h, 16, 0), (d, 511, W), (st, 1, W)]), IOERR, st)
    assert g.mem.read(d, 511) == b"\xa5" * 511


def test_out_data_not_multiple_of_512(guest):
    g = guest
    h, d = write_request(g, 513)
    st = g.status()
    answered(g, g.chain([(h, 16, 0), (d, 513, 0), (st, 1, W)]), IOERR, st)
    assert ("write", 0, 513, False) not in g.stack.img.ops


def test_sector_plus_length_beyond_capacity(guest):
    g = guest
    cap = g.stack.img.size // 512
    h, d = write_request(g, 1024, sector=cap - 1)
    st = g.status()
    answered(g, g.chain([(h, 16, 0), (d, 1024, 0), (st, 1, W)]), IOERR, st)
    h2, d2 = write_request(g, 512, sector=(1 << 64) - 1)  # sector arithmetic must not wrap
    st2 = g.status()
    answered(g, g.chain([(h2, 16, 0), (d2, 512, 0), (st2, 1, W)]), IOERR, st2)


def test_discard_with_unmap(guest):
    g = guest
    h = g.header(S.VIRTIO_BLK_T_DISCARD)
    seg = g.buf(
        16, S.virtio_blk_discard_write_zeroes.pack(0, 8, S.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
    )
    st = g.status()
    answered(g, g.chain([(h, 16, 0), (seg, 16, 0), (st, 1, W)]), UNSUPP, st)
    assert not [op for op in g.stack.img.ops if op[0] == "discard"]


def test_unknown_segment_flags(guest):
    g = guest
    h = g.header(S.VIRTIO_BLK_T_WRITE_ZEROES)
    segs = S.virtio_blk_discard_write_zeroes.pack(0, 8, 0) + S.virtio_blk_discard_write_zeroes.pack(
        8, 8, 2
    )
    seg = g.buf(32, segs)
    st = g.status()
    g.stack.img.data[:8192] = b"\x77" * 8192
    answered(g, g.chain([(h, 16, 0), (seg, 32, 0), (st, 1, W)]), UNSUPP, st)
    assert (
        g.stack.img.data[:4096] == b"\x77" * 4096
    )  # the good first segment was not acted on either


def test_get_id_buffer_shorter_than_20(guest):
    g = guest
    h = g.header(S.VIRTIO_BLK_T_GET_ID)
    d = g.buf(19, writable=True)
    st = g.status()
    answered(g, g.chain([(h, 16, 0), (d, 19, W), (st, 1, W)]), IOERR, st)
    assert g.mem.read(d, 19) == b"\xa5" * 19


def test_unknown_request_type(guest):
    g = guest
    h = g.header(0x7777)
    st = g.status()
    answered(g, g.chain([(h, 16, 0), (st, 1, W)]), UNSUPP, st)


def test_write_to_read_only_device():
    g = Guest(Stack(FakeImage(read_only=True), queue_size=8))
    assert g.drv.features >> S.VIRTIO_BLK_F_RO & 1
    h, d = write_request(g)
    st = g.status()
    used, bad = g.run(g.chain([(h, 16, 0), (d, 512, 0), (st, 1, W)]))
    assert used == [(0, 1)] and bad == [] and g.mem.read(st, 1)[0] == IOERR
    assert g.stack.img.data[:512] == bytes(512) and not [
        o for o in g.stack.img.ops if o[0] == "write"
    ]


def _needs_reset_then_recovers(g, used, bad):
    assert used == [] and bad == []
    dev = g.stack.dev
    assert dev.status & S.DEVICE_NEEDS_RESET
    assert g.drv.config_interrupts == 1  # 2.1.2: config change notification with DRIVER_OK set
    g.drv.notify(0)  # a broken device serves nothing more ...
    assert g.dq.reap_raw() == []
    g.drv.start()  # ... until the driver resets it
    assert not dev.status & S.DEVICE_NEEDS_RESET
    g.dq = g.drv.queues[0]
    serves_next(g)


def test_avail_idx_jumps_ahead_more_than_queue_size(guest):
    g = guest
    h, d = write_request(g)
    st = g.status()
    g.chain([(h, 16, 0), (d, 512, 0), (st, 1, W)])
    g.dq.set_avail_idx(g.dq.avail_idx + 9)  # queue of 8
    before = g.mem.read(0, g.mem.size)
    g.drv.notify(0)
    used = g.dq.reap_raw()
    after = g.mem.read(0, g.mem.size)
    assert g.stack.img.ops == []
    _needs_reset_then_recovers(g, used, [i for i in range(len(before)) if before[i] != after[i]])


def test_head_index_beyond_queue_size(guest):
    g = guest
    used, bad = g.run(8)
    _needs_reset_then_recovers(g, used, bad)


def test_head_reused_while_in_flight():
    g = Guest(Stack(FakeImage(defer=True), queue_size=8))
    h, d = write_request(g)
    st = g.status()
    head = g.chain([(h, 16, 0), (d, 512, 0), (st, 1, W)])
    g.dq.push_head(head)
    g.dq.push_head(head)
    g.drv.notify(0)
    assert g.stack.dev.status & S.DEVICE_NEEDS_RESET
    assert len(g.stack.img.pending) == 1
    g.stack.img.complete()
    assert g.dq.reap_raw() == [(head, 1)]  # the first one is still answered


def test_chain_total_over_2_32_bytes():
    """Two writable buffers of nearly 4 GiB each: the byte total passes 2^32 (2.7.5.2). Guest
    memory here is a stand-in that maps every range, so only the total check can refuse it."""
    from vblock.virtio.chain import ChainError, walk

    big = (1 << 32) - 16
    table = bytearray(64)
    S.virtq_desc.pack_into(table, 0, 0, 16, S.VIRTQ_DESC_F_NEXT, 1)
    S.virtq_desc.pack_into(table, 16, 0, big, S.VIRTQ_DESC_F_NEXT | W, 2)
    S.virtq_desc.pack_into(table, 32, 0, big, S.VIRTQ_DESC_F_NEXT | W, 3)
    S.virtq_desc.pack_into(table, 48, 0, 1, W, 0)

    class Everything:
        _base0 = _end0 = 0
        _view0 = None

        def view(self, addr, length):
            return memoryview(b"")

    with pytest.raises(ChainError, match="2\\^32"):
        walk(Everything(), memoryview(table), 4, 0, False, 4)


# -- packed virtqueues (2.8) ----------------------------------------------------------------------


@pytest.fixture
def pguest():
    return PackedGuest(
        Stack(FakeImage(), packed=True, queue_size=8, queue_size_max=8, indirect=True)
    )


def packed_unanswerable(g, bid):
    g.writable = []
    used, bad = g.run()
    assert used == [(bid, 0)] and bad == []
    assert not g.stack.dev.status & S.DEVICE_NEEDS_RESET
    serves_next(g)


def test_packed_chain_that_never_ends(pguest):
    g = pguest
    h, d = write_request(g)
    g.pchain(
        [(h, 16, 0)] + [(d, 512, 0)] * 6 + [(d, 512, 0, True)], buffer_id=1
    )  # 8 of 8, all NEXT
    used, bad = g.run()
    assert used == [] and bad == []
    assert g.stack.dev.status & S.DEVICE_NEEDS_RESET


def test_packed_buffer_id_beyond_queue_size(pguest):
    g = pguest
    h, d = write_request(g)
    g.pchain([(h, 16, 0), (d, 512, 0), (g.status(), 1, W)], buffer_id=8)
    used, bad = g.run()
    assert used == [] and bad == [] and g.stack.dev.status & S.DEVICE_NEEDS_RESET


def test_packed_buffer_id_reused_while_in_flight():
    g = PackedGuest(Stack(FakeImage(defer=True), packed=True, queue_size=8))
    for _ in range(2):
        h, d = write_request(g)
        g.pchain([(h, 16, 0), (d, 512, 0), (g.status(), 1, W)], buffer_id=3)
    g.drv.notify(0)
    assert g.stack.dev.status & S.DEVICE_NEEDS_RESET and len(g.stack.img.pending) == 1


def test_packed_nested_indirect(pguest):
    g = pguest
    h, d = write_request(g)
    inner = g.indirect_table([(d, 512, 0), (g.status(), 1, W)])
    table = g.indirect_table([(h, 16, 0), (inner[0], inner[1], IND)])
    packed_unanswerable(g, g.pchain([(table[0], table[1], IND)], buffer_id=2))


def test_packed_indirect_after_chained_descriptor(pguest):
    g = pguest
    h, d = write_request(g)
    table = g.indirect_table([(d, 512, 0), (g.status(), 1, W)])
    packed_unanswerable(g, g.pchain([(h, 16, 0), (table[0], table[1], IND)], buffer_id=2))


def test_packed_indirect_length_not_multiple_of_16(pguest):
    g = pguest
    h, d = write_request(g)
    table = g.indirect_table([(h, 16, 0), (d, 512, 0), (g.status(), 1, W)])
    packed_unanswerable(g, g.pchain([(table[0], table[1] - 1, IND)], buffer_id=4))


def test_packed_zero_length_buffer(pguest):
    g = pguest
    h, d = write_request(g)
    packed_unanswerable(g, g.pchain([(h, 16, 0), (d, 0, 0), (g.status(), 1, W)], buffer_id=5))


def test_packed_address_plus_length_wraps_2_64(pguest):
    g = pguest
    h = g.header(IN, 0)
    st = g.status()
    bid = g.pchain([(h, 16, 0), ((1 << 64) - 100, 512, W), (st, 1, W)], buffer_id=6)
    answered_ioerr_in_status_only(g, bid, st, run=g.run)


def test_packed_address_beyond_guest_memory(pguest):
    g = pguest
    h = g.header(OUT, 0)
    st = g.status()
    bid = g.pchain([(h, 16, 0), (g.mem.size - 256, 512, 0), (st, 1, W)], buffer_id=2)
    answered_ioerr_in_status_only(g, bid, st, run=g.run)


def test_packed_data_beyond_guest_memory_in_an_indirect_table(pguest):
    g = pguest
    h = g.header(IN, 0)
    st = g.status()
    entries = [
        (h, 16, 0, 0),
        (g.mem.size, 512, 0, W),
        (st, 1, 0, W),
    ]  # packed layout: addr, len, id, flags
    table = g.alloc(16 * len(entries))
    for i, e in enumerate(entries):
        S.pvirtq_desc.pack_into(g.mem.view(table, 16 * len(entries)), 16 * i, *e)
    bid = g.pchain([(table, 16 * len(entries), IND)], buffer_id=3)
    answered_ioerr_in_status_only(g, bid, st, run=g.run)


def test_packed_status_byte_beyond_guest_memory(pguest):
    g = pguest
    h = g.header(IN, 0)
    d = g.buf(512)
    packed_unanswerable(g, g.pchain([(h, 16, 0), (d, 512, W), (g.mem.size, 1, W)], buffer_id=7))


def test_packed_writable_header_and_missing_status(pguest):
    g = pguest
    h = g.header(IN, 0, writable=True)
    d = g.buf(512, writable=True)
    st = g.status()
    g.pchain([(h, 16, W), (d, 512, W), (st, 1, W)], buffer_id=0)
    used, bad = g.run()
    assert used == [(0, 1)] and bad == [] and g.mem.read(st, 1)[0] == IOERR
    h, d = write_request(g)
    packed_unanswerable(g, g.pchain([(h, 16, 0), (d, 512, 0)], buffer_id=1))


def test_refused_head_does_not_keep_wait_idle_waiting():
    """Found by the virtqueue fuzz target: a head >= queue size puts the device in NEEDS_RESET;
    that head never comes back, so ``wait_idle`` must not wait for it."""
    import vblock
    from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
    from vblock.virtio.driver import Driver

    img = vblock.open_image(None, format="memory", size=1 << 20)
    mem = GuestMemory.anonymous(1 << 20)
    dev = VirtioBlk(img, mem, queue_size_max=8)
    drv = Driver(VirtioMmio(dev), mem)
    drv.start()
    dq = drv.queues[0]
    dq.push_head(dq.size)  # out of range
    drv.notify(0)
    assert dev.status & S.DEVICE_NEEDS_RESET
    assert dev.wait_idle(timeout=5) is True
    img.close()

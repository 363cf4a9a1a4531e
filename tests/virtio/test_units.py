"""Unit tests of the transport-free pieces: spec layouts, guest memory, chain cursors, the split
queue's suppression logic."""

from __future__ import annotations

import mmap

import pytest

from vblock.errors import GuestError
from vblock.virtio import GuestMemory, GuestMemoryError
from vblock.virtio import spec as S
from vblock.virtio.chain import gather, split_back, split_front
from vblock.virtio.queue import SplitQueue


# -- spec ---------------------------------------------------------------------------------------
def test_config_layout_matches_the_spec_offsets():
    # bindgen asserts in virtio-bindings: size 96, num_queues at 34 (0x22), writeback at 0x20
    assert S.virtio_blk_config.size == 96
    fields = [0] * 29
    fields[11] = 0xAB  # writeback
    fields[13] = 0x1234  # num_queues
    fields[19] = 0xCD  # write_zeroes_may_unmap
    fields[28] = 0xEF  # zoned.model
    raw = S.virtio_blk_config.pack(*fields)
    assert (
        raw[0x20] == 0xAB
        and raw[0x22:0x24] == b"\x34\x12"
        and raw[0x38] == 0xCD
        and raw[0x5C] == 0xEF
    )
    assert (
        S.virtio_blk_req_hdr.size == 16 and S.virtq_desc.size == 16 and S.virtq_used_elem.size == 8
    )
    assert S.virtio_blk_discard_write_zeroes.size == 16


@pytest.mark.parametrize(
    "event,new,old,expected",
    [
        (0, 1, 0, True),  # the first entry after used_event 0
        (5, 5, 4, False),  # used_event 5 is reached only when idx passes 5
        (4, 5, 4, True),
        (3, 10, 0, True),  # a batch that crosses the event
        (10, 10, 0, False),
        (0xFFFF, 2, 0xFFFE, True),  # wrap
        (1, 2, 0xFFFE, True),
        (2, 2, 0xFFFE, False),
    ],
)
def test_vring_need_event(event, new, old, expected):
    assert S.vring_need_event(event, new, old) is expected


# -- guest memory ---------------------------------------------------------------------------------
def test_memory_views_are_zero_copy_and_checked():
    buf = bytearray(4096)
    mem = GuestMemory([(0x10000, buf)])
    v = mem.view(0x10010, 4)
    v[:] = b"abcd"
    assert buf[0x10:0x14] == b"abcd"
    assert mem.read(0x10010, 4) == b"abcd"
    for addr, n in [(0xFFFF, 1), (0x10000 + 4095, 2), (0x11000, 1), (-1, 1), ((1 << 64) - 1, 2)]:
        with pytest.raises(GuestMemoryError):
            mem.view(addr, n)
        assert not mem.contains(addr, n)
    assert isinstance(GuestMemoryError("x"), GuestError)


def test_memory_refuses_ranges_spanning_regions_and_overlaps():
    mem = GuestMemory([(0, bytearray(4096)), (4096, bytearray(4096)), (1 << 40, bytearray(4096))])
    assert mem.contains(4096 + 100, 100) and mem.contains((1 << 40) + 4000, 96)
    assert not mem.contains(4000, 200)  # adjacent regions are still two buffers
    assert not mem.contains(8192, 1)  # the gap
    with pytest.raises(ValueError):
        GuestMemory([(0, bytearray(4096)), (4095, bytearray(10))])
    with pytest.raises(ValueError):
        GuestMemory([((1 << 64) - 10, bytearray(20))])


def test_anonymous_memory_is_page_aligned_mmap():
    mem = GuestMemory.anonymous(1 << 16, base=1 << 20)
    ((base, view),) = mem.regions
    assert base == 1 << 20 and len(view) == 1 << 16 and mem.size == 1 << 16
    assert isinstance(mem._keep[0], mmap.mmap)


# -- cursors: whole, byte by byte, with trailing data (h11's tr()) -------------------------------------
def _cut(data, sizes):
    views, pos = [], 0
    for n in sizes:
        views.append(memoryview(data)[pos : pos + n])
        pos += n
    return views


@pytest.mark.parametrize("sizes", [[40], [16, 24], [1] * 40, [15, 2, 23], [3, 13, 1, 23]])
@pytest.mark.parametrize("n", [1, 16, 17, 39])
def test_split_front_and_back_keep_every_byte_in_order(sizes, n):
    data = bytes(range(40))
    front, back = split_front(_cut(data, sizes), n)
    assert gather(front) == data[:n] and gather(back) == data[n:]
    front, back = split_back(_cut(data, sizes), n)
    assert gather(front) == data[:-n] and gather(back) == data[-n:]


# -- split queue ----------------------------------------------------------------------------------
def _queue(event_idx, size=8):
    mem = GuestMemory.anonymous(1 << 16)
    q = SplitQueue(size)
    q.size, q.desc_addr, q.driver_addr, q.device_addr = size, 0x1000, 0x2000, 0x3000
    q.activate(mem, event_idx)
    return mem, q


def test_queue_activation_checks_size_alignment_and_placement():
    mem = GuestMemory.anonymous(1 << 16)
    q = SplitQueue(16)
    q.desc_addr, q.driver_addr, q.device_addr = 0x1000, 0x2000, 0x3000
    for size in (0, 3, 32):
        q.size = size
        assert "power of 2" in q.check(mem)
    q.size = 16
    assert q.check(mem) is None
    q.desc_addr = 0x1008
    assert "aligned" in q.check(mem)
    q.desc_addr, q.device_addr = 0x1000, (1 << 16) - 8
    assert "inside guest memory" in q.check(mem)


def test_notification_suppression_without_event_idx():
    mem, q = _queue(False)
    q.disable_notification()
    assert mem.read(0x3000, 2) == b"\x01\x00"  # NO_NOTIFY while draining
    assert q.enable_notification() is False
    assert mem.read(0x3000, 2) == b"\x00\x00"
    S.le16.pack_into(mem.view(0x2002, 2), 0, 1)  # the driver adds a buffer meanwhile
    q.disable_notification()
    assert q.enable_notification() is True  # re-check after re-enable sees it
    q.add_used(0, 1)
    q.publish_used()
    assert q.needs_notification() is True
    assert q.needs_notification() is False  # nothing new since the last decision
    S.le16.pack_into(mem.view(0x2000, 2), 0, S.VIRTQ_AVAIL_F_NO_INTERRUPT)
    q.add_used(1, 1)
    q.publish_used()
    assert q.needs_notification() is False


def test_notification_suppression_with_event_idx():
    mem, q = _queue(True)
    q.disable_notification()
    assert mem.read(0x3000, 2) == b"\x00\x00"  # flags untouched with EVENT_IDX
    S.le16.pack_into(mem.view(0x2002, 2), 0, 3)
    assert q.available() == 3
    for _ in range(3):
        q.pop_head()
    assert q.enable_notification() is False
    assert S.le16.unpack_from(mem.view(0x3000 + 4 + 8 * 8, 2))[0] == 3  # avail_event = next_avail
    S.le16.pack_into(mem.view(0x2000 + 4 + 2 * 8, 2), 0, 1)  # used_event = 1
    q.add_used(0, 1)
    q.publish_used()
    assert q.needs_notification() is False  # idx 1 does not pass used_event 1
    q.add_used(1, 1)
    q.add_used(2, 1)
    q.publish_used()
    assert q.needs_notification() is True  # the batch 1..3 crossed it
    S.le16.pack_into(mem.view(0x2002, 2), 0, 3 + 9)
    with pytest.raises(GuestError):
        q.available()  # 9 ahead of a queue of 8

"""Virtio constants and wire structures, with the spec's own names (virtio 1.2, chapters 2, 4.2.2, 5.2).

One ``struct.Struct`` per structure, little-endian (the modern interface; legacy guest-endian layouts
are not supported). Nothing else in ``vblock.virtio`` spells a format string or a magic number.
"""

from __future__ import annotations

import struct

# -- device status (2.1) ------------------------------------------------------------------------
ACKNOWLEDGE = 1
DRIVER = 2
DRIVER_OK = 4
FEATURES_OK = 8
DEVICE_NEEDS_RESET = 64
FAILED = 128

# -- device-independent feature bits (6) -----------------------------------------------------------
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35

# -- block device (5.2) ---------------------------------------------------------------------------
VIRTIO_ID_BLOCK = 2

VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_GEOMETRY = 4
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_TOPOLOGY = 10
VIRTIO_BLK_F_CONFIG_WCE = 11
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_T_DISCARD = 11
VIRTIO_BLK_T_WRITE_ZEROES = 13

VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2

VIRTIO_BLK_ID_BYTES = 20  # 5.2.6: GET_ID data is exactly 20 bytes
VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP = 1  # 5.2.6: bit 0 of virtio_blk_discard_write_zeroes.flags
SECTOR_SIZE = 512  # 5.2.5: sector is always in 512-byte units, whatever blk_size says
SECTOR_SHIFT = 9

# struct virtio_blk_req header (5.2.6): le32 type; le32 reserved; le64 sector
virtio_blk_req_hdr = struct.Struct("<IIQ")
# struct virtio_blk_discard_write_zeroes (5.2.6): le64 sector; le32 num_sectors; le32 flags
virtio_blk_discard_write_zeroes = struct.Struct("<QII")

# struct virtio_blk_config (5.2.4), 96 bytes; field offsets checked by tests/virtio/test_spec.py
virtio_blk_config = struct.Struct(
    "<Q"  # 0x00 capacity (512-byte sectors)
    "I"  # 0x08 size_max
    "I"  # 0x0c seg_max
    "HBB"  # 0x10 geometry.cylinders, heads, sectors
    "I"  # 0x14 blk_size
    "BBHI"  # 0x18 physical_block_exp, alignment_offset, min_io_size, opt_io_size
    "BBH"  # 0x20 writeback, unused0, num_queues
    "III"  # 0x24 max_discard_sectors, max_discard_seg, discard_sector_alignment
    "II"  # 0x30 max_write_zeroes_sectors, max_write_zeroes_seg
    "B3x"  # 0x38 write_zeroes_may_unmap, unused1[3]
    "III"  # 0x3c max_secure_erase_sectors, max_secure_erase_seg, secure_erase_sector_alignment
    "IIIII"  # 0x48 zoned: zone_sectors, max_open_zones, max_active_zones, max_append_sectors, write_granularity
    "B3x"  # 0x5c zoned.model, unused2[3]
)
VIRTIO_BLK_CONFIG_WRITEBACK_OFFSET = 0x20

# -- split virtqueue (2.7) --------------------------------------------------------------------------
VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1
VIRTQ_MAX_SIZE = 32768  # 2.7: queue size is a power of 2, at most 32768

# struct virtq_desc (2.7.5): le64 addr; le32 len; le16 flags; le16 next
virtq_desc = struct.Struct("<QIHH")
# struct virtq_used_elem (2.7.8): le32 id; le32 len
virtq_used_elem = struct.Struct("<II")
le16 = struct.Struct("<H")
le32 = struct.Struct("<I")
le64 = struct.Struct("<Q")

VIRTQ_DESC_SIZE = virtq_desc.size  # 16
VIRTQ_AVAIL_RING_OFFSET = 4  # after le16 flags, le16 idx
VIRTQ_USED_RING_OFFSET = 4
VIRTQ_DESC_ALIGN, VIRTQ_AVAIL_ALIGN, VIRTQ_USED_ALIGN = 16, 2, 4  # 2.7 table


def desc_table_bytes(size):
    return VIRTQ_DESC_SIZE * size


def avail_ring_bytes(size):
    """flags, idx, ring[size], used_event (2.7.6)."""
    return 6 + 2 * size


def used_ring_bytes(size):
    """flags, idx, ring[size] of virtq_used_elem, avail_event (2.7.8)."""
    return 6 + 8 * size


def vring_need_event(event_idx, new_idx, old_idx):
    """2.7.7.2 / 2.7.10 (the spec's ``vring_need_event``): true when ``event_idx`` lies in the
    window of indices ``[old_idx, new_idx)`` just published, all arithmetic modulo 2^16."""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


# -- packed virtqueue (2.8) ------------------------------------------------------------------------
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
RING_EVENT_FLAGS_ENABLE = 0x0
RING_EVENT_FLAGS_DISABLE = 0x1
RING_EVENT_FLAGS_DESC = 0x2  # only with VIRTIO_F_EVENT_IDX
PACKED_EVENT_ALIGN = 4

# struct pvirtq_desc (2.8.13): le64 addr; le32 len; le16 id; le16 flags
pvirtq_desc = struct.Struct("<QIHH")
PVIRTQ_ID_OFFSET = 12
PVIRTQ_FLAGS_OFFSET = 14
# struct pvirtq_event_suppress (2.8.14): le16 desc (off:15, wrap:1); le16 flags (2 bits)
pvirtq_event_suppress = struct.Struct("<HH")


def packed_ring_bytes(size):
    return 16 * size


def packed_need_event(off_wrap, size, old_pos, new_pos):
    """2.8.10/2.8.21 with EVENT_IDX: whether the positions ``[old_pos, new_pos)`` just made
    available (or used) include the one named by ``off_wrap`` (offset in the ring, bit 15 the
    wrap counter it is expected with). Positions are absolute (unwrapped) counts from the start,
    where lap ``L`` of the ring runs with wrap counter ``1 ^ (L & 1)`` (counters start at 1)."""
    if new_pos <= old_pos:
        return False
    off = off_wrap & 0x7FFF
    wrap = off_wrap >> 15
    lap = (new_pos - 1) // size
    if wrap != 1 ^ (lap & 1):
        lap -= 1
    event = lap * size + off
    return old_pos <= event < new_pos


# -- virtio-mmio version 2 (4.2.2) -----------------------------------------------------------------
MMIO_MAGIC_VALUE = 0x74726976  # "virt"
MMIO_VERSION = 2
MMIO_VENDOR_ID = 0x554D4551  # "QEMU" in ASCII, as most virtio-mmio devices report

VIRTIO_MMIO_MAGIC_VALUE = 0x000
VIRTIO_MMIO_VERSION = 0x004
VIRTIO_MMIO_DEVICE_ID = 0x008
VIRTIO_MMIO_VENDOR_ID = 0x00C
VIRTIO_MMIO_DEVICE_FEATURES = 0x010
VIRTIO_MMIO_DEVICE_FEATURES_SEL = 0x014
VIRTIO_MMIO_DRIVER_FEATURES = 0x020
VIRTIO_MMIO_DRIVER_FEATURES_SEL = 0x024
VIRTIO_MMIO_QUEUE_SEL = 0x030
VIRTIO_MMIO_QUEUE_NUM_MAX = 0x034
VIRTIO_MMIO_QUEUE_NUM = 0x038
VIRTIO_MMIO_QUEUE_READY = 0x044
VIRTIO_MMIO_QUEUE_NOTIFY = 0x050
VIRTIO_MMIO_INTERRUPT_STATUS = 0x060
VIRTIO_MMIO_INTERRUPT_ACK = 0x064
VIRTIO_MMIO_STATUS = 0x070
VIRTIO_MMIO_QUEUE_DESC_LOW = 0x080
VIRTIO_MMIO_QUEUE_DESC_HIGH = 0x084
VIRTIO_MMIO_QUEUE_DRIVER_LOW = 0x090
VIRTIO_MMIO_QUEUE_DRIVER_HIGH = 0x094
VIRTIO_MMIO_QUEUE_DEVICE_LOW = 0x0A0
VIRTIO_MMIO_QUEUE_DEVICE_HIGH = 0x0A4
VIRTIO_MMIO_SHM_SEL = 0x0AC
VIRTIO_MMIO_SHM_LEN_LOW = 0x0B0
VIRTIO_MMIO_SHM_LEN_HIGH = 0x0B4
VIRTIO_MMIO_SHM_BASE_LOW = 0x0B8
VIRTIO_MMIO_SHM_BASE_HIGH = 0x0BC
VIRTIO_MMIO_QUEUE_RESET = 0x0C0
VIRTIO_MMIO_CONFIG_GENERATION = 0x0FC
VIRTIO_MMIO_CONFIG = 0x100
VIRTIO_MMIO_WINDOW = 0x200  # bytes mapped per device (Linux: virtio_mmio.device=512@...)

VIRTIO_MMIO_INT_VRING = 1  # InterruptStatus bit 0: used buffer notification
VIRTIO_MMIO_INT_CONFIG = 2  # bit 1: configuration change

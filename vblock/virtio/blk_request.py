"""virtio-blk requests (virtio 1.2, 5.2.6): parse a walked chain, finish with a status byte.

Transport-free and backend-free: :func:`parse` turns a :class:`~vblock.virtio.chain.DescriptorChain`
into a :class:`BlkRequest` (every request-level check is made here, and for the frames it serves,
in :func:`frame_reader`'s fast path, which repeats the IN/OUT ones), the device executes it,
and :func:`finish` writes the status byte and returns the used length. ``finish`` is the one place
where an outcome (``None``, a ``GuestError`` carrying its status, a backend exception) becomes a
virtio status.

Framing is layout-agnostic (2.7.4: the device MUST NOT assume any particular arrangement of
descriptors): the header is the first 16 readable bytes, the status is the last writable byte,
and the data is whatever lies between, in any number of pieces.

* no writable byte at all: there is nowhere to answer, so :class:`ChainError` (head returned with
  used length 0, nothing written);
* a chain with a buffer outside guest memory whose status byte is inside (``chain.fault``): IOERR
  in that byte, no data moved;
* fewer than 16 readable bytes (a missing or writable header): IOERR;
* a valid frame whose content is wrong - data in the wrong direction, a length that is not a
  multiple of 512, a range past capacity, a GET_ID buffer under 20 bytes, a write to a read-only
  device, too many segments: IOERR (QEMU ``virtio_blk_sect_range_ok``, Firecracker, rust-vmm);
* an unknown or un-negotiated type, unknown segment flags, DISCARD with ``unmap``: UNSUPP
  (5.2.6.2 "MUST" for the flags cases).

:func:`frame_reader` is the device's fast path over both steps: the native accelerator
(``native/vring.c``) walks a split-ring chain and, when it is an IN or OUT request in the standard
layout (16-byte header, data, 1-byte status, all in guest memory's largest region), says where the
parts are; every other chain is walked and parsed by :func:`~vblock.virtio.chain.walk` and
:func:`parse`, the reference, with the same result.

Used length (2.7.8) = bytes the device wrote into writable buffers: data + 1 for IN and GET_ID
on success, 1 otherwise (an underestimate is allowed, an overestimate is not).
"""

from __future__ import annotations

import struct

from vblock.errors import GuestError, UnsupportedError
from vblock.virtio import _binding
from vblock.virtio._binding import buffer_address
from vblock.virtio.chain import ChainError, gather, split_back, split_front, walk
from vblock.virtio.spec import (
    SECTOR_SHIFT,
    SECTOR_SIZE,
    VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
    virtio_blk_discard_write_zeroes,
    virtio_blk_req_hdr,
)

__all__ = ["BlkRequest", "RequestRules", "parse", "frame_reader", "finish"]

_NATIVE_MAX_BUFFERS = 1024  # longer chains (rare) are walked by the reference

_HDR = virtio_blk_req_hdr.size  # 16
_SEG = virtio_blk_discard_write_zeroes.size  # 16
_unpack_hdr = virtio_blk_req_hdr.unpack_from
_unpack_seg = virtio_blk_discard_write_zeroes.unpack_from


def _ioerr(message):
    return GuestError(message, VIRTIO_BLK_S_IOERR)


def _unsupp(message):
    return GuestError(message, VIRTIO_BLK_S_UNSUPP)


class RequestRules:
    """What :func:`parse` checks requests against: the device's capacity and negotiated
    capabilities. The device rebuilds it when features are accepted or capacity changes."""

    __slots__ = (
        "capacity_sectors",
        "read_only",
        "flush",
        "discard",
        "write_zeroes",
        "max_discard_sectors",
        "max_discard_seg",
        "max_write_zeroes_sectors",
        "max_write_zeroes_seg",
        "serial",
    )

    def __init__(
        self,
        capacity_sectors,
        read_only=False,
        flush=True,
        discard=True,
        write_zeroes=True,
        max_discard_sectors=0x3FFFFF,
        max_discard_seg=32,
        max_write_zeroes_sectors=0x3FFFFF,
        max_write_zeroes_seg=32,
        serial=b"",
    ):
        self.capacity_sectors = capacity_sectors
        self.read_only = read_only
        self.flush = flush
        self.discard = discard
        self.write_zeroes = write_zeroes
        self.max_discard_sectors = max_discard_sectors
        self.max_discard_seg = max_discard_seg
        self.max_write_zeroes_sectors = max_write_zeroes_sectors
        self.max_write_zeroes_seg = max_write_zeroes_seg
        self.serial = bytes(serial[:VIRTIO_BLK_ID_BYTES]).ljust(VIRTIO_BLK_ID_BYTES, b"\0")


class BlkRequest:
    """One request, from parse to finish. The device keeps one per descriptor head and reuses it
    (so ``busy`` also tells whether a head is in flight).

    ``type``: the request type; ``offset`` / ``length``: bytes on the disk (IN/OUT); ``data``: the
    data views (writable for IN/GET_ID, readable for OUT); ``segments``: ``[(offset, length,
    unmap)]`` in bytes for DISCARD/WRITE_ZEROES; ``status``: the 1-byte view of the status;
    ``used_len``: the used length on success.
    """

    __slots__ = (
        "head",
        "type",
        "offset",
        "length",
        "data",
        "segments",
        "status",
        "used_len",
        "busy",
        "owner",
        "ndesc",
    )

    def __init__(self, head, owner=None):
        self.head = head
        self.owner = owner
        self.busy = False
        self.type = self.offset = self.length = self.used_len = 0
        self.ndesc = 1  # packed rings: ring descriptors the chain took (its used entry skips them)
        self.data = self.segments = self.status = None


def _check_range(sector, nbytes, rules):
    """IN/OUT and segment ranges: a multiple of 512 (5.2.6.1), inside capacity, overflow-safe as
    QEMU ``virtio_blk_sect_range_ok`` writes it."""
    if nbytes % SECTOR_SIZE:
        raise _ioerr(f"data length {nbytes} is not a multiple of 512")
    total = rules.capacity_sectors
    if sector > total or (nbytes >> SECTOR_SHIFT) > total - sector:
        raise _ioerr(f"sectors {sector}+{nbytes >> SECTOR_SHIFT} beyond capacity {total}")


def parse(req, chain, rules):
    """Fill ``req`` from ``chain`` under ``rules``.

    Raises ``ChainError`` when the frame has no status byte (nothing is set), or ``GuestError``
    with its status after ``req.status`` is set (the caller answers through :func:`finish`).
    """
    writable = chain.writable
    if not writable:
        raise ChainError(
            "no device-writable status byte"
        )  # 5.2.6: status is the last, writable byte
    if chain.fault is not None:
        req.status = writable[-1][-1:]  # the walk kept only the last writable buffer, in memory
        req.used_len = 1
        raise _ioerr(f"buffer outside guest memory: {chain.fault}")
    last = writable[-1]
    if len(last) == 1:
        req.status = last
        data_w = writable[:-1]
    else:
        data_w, status = split_back(writable, 1)
        req.status = status[0]
    wbytes = chain.writable_bytes - 1
    rbytes = chain.readable_bytes - _HDR
    if rbytes < 0:
        raise _ioerr("request header missing: fewer than 16 device-readable bytes")  # 5.2.6
    readable = chain.readable
    first = readable[0]
    if len(first) == _HDR:
        type_, _reserved, sector = _unpack_hdr(first)
        data_r = readable[1:]
    elif len(first) > _HDR:
        type_, _reserved, sector = _unpack_hdr(first)
        data_r = [first[_HDR:], *readable[1:]]
    else:
        hdr, data_r = split_front(readable, _HDR)
        type_, _reserved, sector = _unpack_hdr(gather(hdr))
    req.type = type_
    req.used_len = 1

    if type_ == VIRTIO_BLK_T_IN:
        if rbytes:
            raise _ioerr("IN request with device-readable data")  # 5.2.6: IN data is writable
        _check_range(sector, wbytes, rules)
        req.offset = sector << SECTOR_SHIFT
        req.length = wbytes
        req.data = data_w
        req.used_len = wbytes + 1
    elif type_ == VIRTIO_BLK_T_OUT:
        if wbytes:
            raise _ioerr("OUT request with device-writable data")  # 5.2.6: OUT data is readable
        if rules.read_only:
            raise _ioerr("write to a read-only device")  # 5.2.6.2: MUST be IOERR, nothing written
        _check_range(sector, rbytes, rules)
        req.offset = sector << SECTOR_SHIFT
        req.length = rbytes
        req.data = data_r
    elif type_ == VIRTIO_BLK_T_FLUSH:
        if not rules.flush:
            raise _unsupp("FLUSH not negotiated")
        if sector:
            raise _ioerr("FLUSH with a non-zero sector")  # 5.2.6.1: driver MUST set sector 0
    elif type_ == VIRTIO_BLK_T_GET_ID:
        if wbytes < VIRTIO_BLK_ID_BYTES:
            raise _ioerr(f"GET_ID buffer of {wbytes} bytes, need 20")  # 5.2.6.1
        req.data = data_w
        req.used_len = VIRTIO_BLK_ID_BYTES + 1
    elif type_ == VIRTIO_BLK_T_DISCARD or type_ == VIRTIO_BLK_T_WRITE_ZEROES:
        _parse_segments(req, type_, data_r, rbytes, wbytes, rules)
    else:
        raise _unsupp(f"unknown request type {type_}")  # 5.2.6.2


def frame_reader(mem, table, queue_size, indirect_ok, indirect_max, rules):
    """A function ``read(req)`` that fills ``req`` from the chain at ``req.head`` of the split
    ring descriptor ``table`` (``queue_size`` entries) exactly as ``parse(req, walk(mem, table,
    queue_size, req.head, indirect_ok, indirect_max), rules)`` does, raising what they raise.

    Standard IN / OUT frames in ``mem``'s largest region are read by the native accelerator
    (the largest: a VM's RAM comes as a small region below 640 KiB and the rest, which holds its
    buffers); everything else by the reference. The reader keeps that region, ``table`` and its
    own output buffer alive (the native walker holds their addresses); the device makes a new
    reader when memory or features change, and ``rules`` may change in place meanwhile.
    Raises ``ValueError`` if ``table`` is shorter than ``queue_size`` descriptors.
    """
    if len(table) < 16 * queue_size:
        raise ValueError(
            f"descriptor table of {len(table)} bytes is shorter than {queue_size} descriptors"
        )
    ffi = _binding.ffi
    native = _binding.lib.vring_blk_frame
    gpa, view0 = max(mem.regions, key=lambda r: len(r[1]))
    out_max = min(queue_size + indirect_max, _NATIVE_MAX_BUFFERS)
    out = bytearray(8 * (2 + 2 * out_max))  # read back with struct: cheaper than cdata indexing
    # Raw addresses, not ffi.from_buffer cdata: a cdata holding a buffer export inside a reference
    # cycle can crash the garbage collector. The reader keeps view0, table and out themselves, and
    # while a memoryview of it lives, no mmap can be closed and no bytearray resized.
    walker = ffi.new(
        "struct vring_split *",
        {
            "region": ffi.cast("uint8_t *", buffer_address(view0)),
            "region_gpa": gpa,
            "region_len": len(view0),
            "table": ffi.cast("uint8_t *", buffer_address(table)),
            "qsize": queue_size,
            "indirect_ok": 1 if indirect_ok else 0,
            "indirect_max": indirect_max,
            "out_max": out_max,
            "out": ffi.cast("uint64_t *", buffer_address(out)),
        },
    )
    unpackers = [struct.Struct(f"<{4 + 2 * n}Q").unpack_from for n in range(min(out_max, 32) + 1)]
    IN = VIRTIO_BLK_T_IN

    def read(req):
        head = req.head
        r = native(walker, head)
        if r < 0:
            parse(req, walk(mem, table, queue_size, head, indirect_ok, indirect_max), rules)
            return
        n = r & 0xFFFF
        v = unpackers[n](out) if n < len(unpackers) else struct.unpack_from(f"<{4 + 2 * n}Q", out)
        sector, nbytes, status = v[0], v[1], v[2]
        req.status = view0[status : status + 1]
        req.type = type_ = r >> 16
        req.used_len = 1
        if type_ != IN and rules.read_only:
            raise _ioerr("write to a read-only device")  # 5.2.6.2: MUST be IOERR, nothing written
        _check_range(sector, nbytes, rules)
        data = []
        for i in range(4, 4 + 2 * n, 2):
            data.append(view0[v[i] : v[i + 1]])
        req.offset = sector << SECTOR_SHIFT
        req.length = nbytes
        req.data = data
        if type_ == IN:
            req.used_len = nbytes + 1

    # What ``walker`` points into lives as long as the reader; the view also keeps ``out`` from
    # being resized (a bytearray with an export cannot be).
    read.keep = (view0, table, memoryview(out), walker)
    return read


def _parse_segments(req, type_, data_r, rbytes, wbytes, rules):
    discard = type_ == VIRTIO_BLK_T_DISCARD
    if discard:
        ok, max_sectors, max_seg, name = (
            rules.discard,
            rules.max_discard_sectors,
            rules.max_discard_seg,
            "DISCARD",
        )
    else:
        ok, max_sectors, max_seg = (
            rules.write_zeroes,
            rules.max_write_zeroes_sectors,
            rules.max_write_zeroes_seg,
        )
        name = "WRITE_ZEROES"
    if not ok:
        raise _unsupp(f"{name} not negotiated")
    if wbytes:
        raise _ioerr(f"{name} with device-writable data")
    if rbytes == 0 or rbytes % _SEG:
        raise _ioerr(f"{name} data of {rbytes} bytes is not a non-zero multiple of 16")  # 5.2.6.1
    nseg = rbytes // _SEG
    if nseg > max_seg:
        raise _ioerr(f"{name} with {nseg} segments, at most {max_seg}")  # 5.2.6.1
    raw = gather(data_r)
    segments = []
    # Every segment is checked before any is acted on (a half-done multi-segment request is
    # indeterminate only when the backend fails, never because a later segment was malformed).
    for i in range(nseg):
        sector, num_sectors, flags = _unpack_seg(raw, i * _SEG)
        if flags & ~VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
            raise _unsupp(f"{name} segment {i} has unknown flags {flags:#x}")  # 5.2.6.2 MUST
        unmap = bool(flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP)
        if discard and unmap:
            raise _unsupp("DISCARD segment with unmap set")  # 5.2.6.2 MUST
        if num_sectors > max_sectors:
            raise _ioerr(f"{name} segment {i} of {num_sectors} sectors, at most {max_sectors}")
        _check_range(sector, num_sectors << SECTOR_SHIFT, rules)
        segments.append((sector << SECTOR_SHIFT, num_sectors << SECTOR_SHIFT, unmap))
    if rules.read_only:
        raise _ioerr(f"{name} on a read-only device")  # 5.2.6.2: MUST be IOERR
    req.segments = segments


def finish(req, outcome):
    """Write the status for ``outcome`` into ``req.status`` and return the used length.

    ``outcome`` is ``None`` (success), a ``GuestError`` (its status), ``UnsupportedError``
    (UNSUPP) or any other exception from the backend (IOERR: ``OSError``, ``ImageError``, ...).
    """
    if outcome is None:
        req.status[0] = VIRTIO_BLK_S_OK
        return req.used_len
    if isinstance(outcome, GuestError) and outcome.status is not None:
        status = outcome.status
    elif isinstance(outcome, UnsupportedError):
        status = VIRTIO_BLK_S_UNSUPP
    else:
        status = VIRTIO_BLK_S_IOERR
    req.status[0] = status
    return 1

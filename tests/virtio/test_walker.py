"""The native fast path (``blk_request.frame_reader``) against the reference (``chain.walk`` then
``blk_request.parse``).

Property: for any descriptor table, head, request header and device rules, the reader fills a
request exactly as the reference does (same type, range, used length, status byte and data buffers,
by address) or raises what the reference raises, with the same message and status. The native part
must really be used, too: a standard read or write in the largest region never reaches the
reference.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vblock.errors import GuestError
from vblock.virtio import GuestMemory, _binding, blk_request
from vblock.virtio import spec as S
from vblock.virtio._binding import buffer_address
from vblock.virtio.blk_request import BlkRequest, RequestRules, frame_reader, parse
from vblock.virtio.chain import ChainError, RingError, walk

NEXT, WRITE, INDIRECT = S.VIRTQ_DESC_F_NEXT, S.VIRTQ_DESC_F_WRITE, S.VIRTQ_DESC_F_INDIRECT
R0, R1 = 0x10000, 0x100000  # two regions of 64 KiB: at 64 KiB and at 1 MiB
REGION = 0x10000
TABLE = R0  # the descriptor table at the start of region 0
INDIRECT_AT = (R0 + 0x1000, R1 + 0x1000)  # an indirect table in each region
HEADERS = (R0 + 0x2000, R1 + 0x2000)  # request headers, one in each region
CAPACITY = 64  # sectors


def _memory():
    return GuestMemory([(R0, bytearray(REGION)), (R1, bytearray(REGION))])


def _place(mem, at, entries):
    view = mem.view(at, 16 * len(entries))
    for i, (addr, length, flags, nxt) in enumerate(entries):
        S.virtq_desc.pack_into(view, 16 * i, addr, length, flags, nxt)
    return view


def _outcome(fill, head):
    """What filling a fresh request gives, comparable across readers: its fields, with buffers
    as (address, length), or the exception."""
    req = BlkRequest(head)
    try:
        fill(req)
    except (ChainError, RingError) as exc:
        return type(exc).__name__, str(exc)
    except GuestError as exc:
        return "GuestError", str(exc), exc.status, buffer_address(req.status)
    pairs = lambda views: None if views is None else [(buffer_address(v), len(v)) for v in views]  # noqa: E731
    return (
        req.type,
        req.offset,
        req.length,
        req.used_len,
        pairs(req.data),
        req.segments,
        buffer_address(req.status),
        len(req.status),
    )


# -- chains: mostly request-shaped, with every field open to mischief -----------------------------
addresses = st.one_of(
    st.integers(R0, R0 + REGION - 1),
    st.integers(R1, R1 + REGION - 1),
    st.sampled_from([0, R0 - 1, R0 + REGION - 8, R1 + REGION - 1, (1 << 64) - 8, (1 << 64) - 1]),
)
lengths = st.one_of(
    st.sampled_from([0, 1, 15, 16, 17, 512, 4096, (1 << 32) - 1]), st.integers(0, 2 * REGION)
)
flag_sets = st.one_of(
    st.sampled_from([NEXT, NEXT | WRITE, WRITE, 0, INDIRECT]), st.integers(0, 0xFFFF)
)


@st.composite
def request_entries(draw, count, pristine):
    """``count`` descriptors linked in order as header -> data -> status (a valid request when
    ``count`` >= 2); unless ``pristine``, any field of any entry may be replaced by something
    arbitrary."""
    kind = draw(st.sampled_from([S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_OUT]))
    entries = []
    for i in range(count):
        last = i == count - 1
        if i == 0:
            addr, length, flags = draw(st.sampled_from(HEADERS[:1] * 7 + HEADERS[1:])), 16, 0
        elif last:
            addr, length, flags = draw(st.integers(R0, R0 + REGION - 1)), 1, WRITE
        else:
            base = R1 if draw(st.integers(0, 7)) == 0 else R0  # now and then the second region
            addr = draw(st.integers(base, base + REGION - 1024))
            length = (
                512 * draw(st.integers(1, 2))
                if draw(st.integers(0, 3))
                else draw(st.integers(1, 1024))
            )
            flags = WRITE if kind == S.VIRTIO_BLK_T_IN else 0
        entry = [addr, length, flags | (0 if last else NEXT), 0 if last else i + 1]
        if not pristine and draw(st.integers(0, 5)) == 0:
            field = draw(st.integers(0, 3))
            entry[field] = draw([addresses, lengths, flag_sets, st.integers(0, count + 1)][field])
        entries.append(tuple(entry))
    return kind, entries


@st.composite
def cases(draw):
    """A table, an indirect table, two request headers, a head and the device's settings: half
    the time a well-formed chain (whose header may still name a type that does not fit its data),
    else one with mischief anywhere."""
    pristine = draw(st.booleans())
    qsize = draw(st.sampled_from([4, 8, 16] if pristine else [1, 2, 4, 8, 16]))
    count = draw(st.integers(3, 5) if pristine else st.integers(1, 5))
    kind, direct = draw(request_entries(min(qsize, count), pristine))
    table = direct + [(0, 0, 0, 0)] * (qsize - len(direct))
    at, inner = None, []
    if (
        draw(st.integers(0, 2)) == 0
    ):  # head 0 points at an indirect table holding the request instead
        at = draw(st.sampled_from(INDIRECT_AT))
        count = draw(st.integers(3, 9) if pristine else st.integers(0, 9))
        length = 16 * count + (0 if pristine else draw(st.sampled_from([0, 0, 8])))
        flags = (
            INDIRECT if pristine else draw(st.sampled_from([INDIRECT, INDIRECT, INDIRECT | NEXT]))
        )
        table[0] = (at, length, flags, 0)
        kind, inner = draw(request_entries(max(count, 1), pristine))
    types = st.sampled_from(
        [kind, kind, kind, 0, 1, 4, 8] + ([] if pristine else [11, 13, 0xFFFFFFFF])
    )
    sectors = (
        st.sampled_from([2**64 - 1, 2**63])
        if draw(st.integers(0, 7)) == 0
        else st.integers(0, CAPACITY + 1)
    )
    headers = [(draw(types), draw(st.integers(0, 2**32 - 1)), draw(sectors)) for _ in HEADERS]
    head = 0 if pristine or draw(st.integers(0, 3)) else draw(st.integers(0, qsize))
    indirect_ok = True if pristine else draw(st.booleans())
    indirect_max = 9 if pristine else draw(st.sampled_from([2, 9]))
    read_only = draw(st.integers(0, 3)) == 0
    return qsize, table, at, inner, headers, head, indirect_ok, indirect_max, read_only


@settings(max_examples=800, deadline=None)
@given(cases())
def test_the_native_reader_agrees_with_walk_and_parse(case):
    qsize, entries, at, inner, headers, head, indirect_ok, indirect_max, read_only = case
    mem = _memory()
    table = _place(mem, TABLE, entries)
    if at is not None:
        _place(mem, at, inner)
    for where, hdr in zip(HEADERS, headers):
        S.virtio_blk_req_hdr.pack_into(mem.view(where, 16), 0, *hdr)
    rules = RequestRules(CAPACITY, read_only=read_only)
    read = frame_reader(mem, table, qsize, indirect_ok, indirect_max, rules)
    expected = _outcome(
        lambda req: parse(req, walk(mem, table, qsize, head, indirect_ok, indirect_max), rules),
        head,
    )
    assert _outcome(read, head) == expected


def _write_request(mem, data_at, kind=S.VIRTIO_BLK_T_OUT, sector=8):
    """A read or write of 8 KiB at ``data_at``, at head 0 of a 4-entry table in region 0."""
    S.virtio_blk_req_hdr.pack_into(mem.view(R0 + 0x100, 16), 0, kind, 0, sector)
    data_flags = WRITE if kind == S.VIRTIO_BLK_T_IN else 0
    return _place(
        mem,
        TABLE,
        [
            (R0 + 0x100, 16, NEXT, 1),
            (data_at, 8192, data_flags | NEXT, 2),
            (R0 + 0x200, 1, WRITE, 0),
            (0, 0, 0, 0),
        ],
    )


def _no_reference(monkeypatch):
    monkeypatch.setattr(blk_request, "walk", lambda *a: pytest.fail("walked by the reference"))
    monkeypatch.setattr(blk_request, "parse", lambda *a: pytest.fail("parsed by the reference"))


@pytest.mark.parametrize("kind", [S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_OUT])
@pytest.mark.parametrize("pieces", [1, 3])
@pytest.mark.parametrize("indirect", [False, True])
def test_a_standard_request_in_the_first_region_never_reaches_the_reference(
    monkeypatch, kind, pieces, indirect
):
    """Direct or in an indirect table, the data in one piece or three: served natively."""
    mem = _memory()
    S.virtio_blk_req_hdr.pack_into(mem.view(R0 + 0x100, 16), 0, kind, 0, 8)
    flags = WRITE if kind == S.VIRTIO_BLK_T_IN else 0
    data = [
        (R0 + 0x4000 + 0x1000 * i, 8192 // pieces if pieces == 1 else (4096, 2048, 2048)[i])
        for i in range(pieces)
    ]
    chain = [(R0 + 0x100, 16, 0)] + [(a, n, flags) for a, n in data] + [(R0 + 0x200, 1, WRITE)]
    entries = [
        (a, n, f | (NEXT if i < len(chain) - 1 else 0), i + 1 if i < len(chain) - 1 else 0)
        for i, (a, n, f) in enumerate(chain)
    ]
    if indirect:
        _place(mem, INDIRECT_AT[0], entries)
        entries = [(INDIRECT_AT[0], 16 * len(entries), INDIRECT, 0)]
    table = _place(mem, TABLE, entries + [(0, 0, 0, 0)] * (8 - len(entries)))
    _no_reference(monkeypatch)
    req = BlkRequest(0)
    frame_reader(mem, table, 8, indirect, 8, RequestRules(CAPACITY))(req)
    assert (req.type, req.offset, req.length) == (kind, 8 * 512, 8192)
    assert [(buffer_address(v), len(v)) for v in req.data] == [
        (buffer_address(mem.view(a, 1)), n) for a, n in data
    ]
    assert buffer_address(req.status) == buffer_address(mem.view(R0 + 0x200, 1))
    assert req.used_len == (8193 if kind == S.VIRTIO_BLK_T_IN else 1)


@pytest.mark.parametrize("buffers", [1022, 1024, 1025, 1100])
def test_long_chains_natively_up_to_the_output_bound_then_by_the_reference(monkeypatch, buffers):
    """A queue of 2048: the native output holds 1024 buffers (header and status included); a
    longer chain is walked by the reference, with the same result."""
    mem = GuestMemory.anonymous(2 << 20)
    data_at = 0x20000
    S.virtio_blk_req_hdr.pack_into(mem.view(0x10000, 16), 0, S.VIRTIO_BLK_T_OUT, 0, 0)
    chain = (
        [(0x10000, 16, 0)]
        + [(data_at + 512 * i, 512, 0) for i in range(buffers - 2)]
        + [(0x10100, 1, WRITE)]
    )
    table = _place(
        mem,
        0,
        [
            (a, n, f | (NEXT if i < buffers - 1 else 0), i + 1 if i < buffers - 1 else 0)
            for i, (a, n, f) in enumerate(chain)
        ]
        + [(0, 0, 0, 0)] * (2048 - buffers),
    )
    calls = []
    real = blk_request.walk
    monkeypatch.setattr(blk_request, "walk", lambda *a: calls.append(1) or real(*a))
    rules = RequestRules(1 << 20)
    got = _outcome(frame_reader(mem, table, 2048, False, 8, rules), 0)
    assert got == _outcome(lambda req: parse(req, walk(mem, table, 2048, 0, False, 8), rules), 0)
    assert got[2] == 512 * (buffers - 2) and len(got[4]) == buffers - 2
    assert calls == ([] if buffers <= 1024 else [1])


def test_other_regions_types_and_broken_chains_go_to_the_reference(monkeypatch):
    mem = _memory()
    calls = []
    real = blk_request.walk
    monkeypatch.setattr(blk_request, "walk", lambda *a: calls.append(a[3]) or real(*a))
    rules = RequestRules(CAPACITY)
    table = _write_request(mem, R1 + 0x4000)  # data in the second region
    req = BlkRequest(0)
    frame_reader(mem, table, 4, False, 4, rules)(req)
    assert buffer_address(req.data[0]) == buffer_address(mem.view(R1 + 0x4000, 1))
    table = _write_request(mem, R0 + 0x4000, kind=S.VIRTIO_BLK_T_GET_ID)
    with pytest.raises(
        GuestError, match="GET_ID"
    ):  # its buffer must be writable: the reference says so
        frame_reader(mem, table, 4, False, 4, rules)(BlkRequest(0))
    S.virtq_desc.pack_into(
        table, 16, R0 + 0x4000, 8192, NEXT, 1
    )  # the data descriptor loops on itself
    with pytest.raises(ChainError, match="loop"):
        frame_reader(mem, table, 4, False, 4, rules)(BlkRequest(0))
    assert calls == [0, 0, 0]


def test_a_range_past_capacity_and_a_read_only_write_are_answered_natively(monkeypatch):
    mem = _memory()
    _no_reference(monkeypatch)
    table = _write_request(mem, R0 + 0x4000, sector=CAPACITY - 8)  # 16 sectors from 56: past 64
    with pytest.raises(GuestError, match="beyond capacity") as err:
        frame_reader(mem, table, 4, False, 4, RequestRules(CAPACITY))(BlkRequest(0))
    assert err.value.status == S.VIRTIO_BLK_S_IOERR
    table = _write_request(mem, R0 + 0x4000)
    with pytest.raises(GuestError, match="read-only") as err:
        frame_reader(mem, table, 4, False, 4, RequestRules(CAPACITY, read_only=True))(BlkRequest(0))
    assert err.value.status == S.VIRTIO_BLK_S_IOERR


def test_the_native_region_is_the_largest_one(monkeypatch):
    """A VM's RAM reaches a vhost-user device as a small region below 640 KiB and the rest: the
    native walker serves the big one (where the buffers are), the reference the small one."""
    low, high = 0xA0000, 0x100000
    mem = GuestMemory([(0, bytearray(low)), (high, bytearray(4 << 20))])
    calls = []
    real = blk_request.walk
    monkeypatch.setattr(blk_request, "walk", lambda *a: calls.append(1) or real(*a))
    for base, expected in ((high, []), (0x1000, [1])):
        S.virtio_blk_req_hdr.pack_into(mem.view(base + 0x100, 16), 0, S.VIRTIO_BLK_T_OUT, 0, 8)
        table = _place(
            mem,
            base,
            [
                (base + 0x100, 16, NEXT, 1),
                (base + 0x4000, 8192, NEXT, 2),
                (base + 0x200, 1, WRITE, 0),
                (0, 0, 0, 0),
            ],
        )
        calls.clear()
        req = BlkRequest(0)
        frame_reader(mem, table, 4, False, 4, RequestRules(CAPACITY))(req)
        assert buffer_address(req.data[0]) == buffer_address(mem.view(base + 0x4000, 1))
        assert calls == expected


def test_a_table_shorter_than_the_queue_is_refused():
    mem = _memory()
    with pytest.raises(ValueError, match="shorter than 1024 descriptors"):
        frame_reader(mem, mem.view(TABLE, 16), 1024, False, 8, RequestRules(CAPACITY))


def test_new_memory_and_late_features_give_the_device_a_new_reader():
    """vhost-user's SET_MEM_TABLE (set_memory) and features accepted after a queue was enabled:
    the reader in use must read the new memory and honour the new features."""
    from vblock.virtio import VirtioBlk, VirtioMmio
    from vblock.virtio.driver import Driver

    img = vblock_null()
    mem = GuestMemory.anonymous(1 << 20)
    dev = VirtioBlk(img, mem, queue_size_max=8)
    Driver(VirtioMmio(dev), mem, queue_size=8).start()
    dq = dev._queues[0]
    first = dq.read
    moved = GuestMemory([(0, bytearray(mem.view(0, 1 << 20)))])
    dev.set_memory(moved)
    assert dq.read is not first
    assert buffer_address(dq.read.keep[0]) == buffer_address(moved.view(0, 1))
    for indirect in (False, True):  # features accepted again with the queue enabled
        bits = dev.driver_features & ~(1 << S.VIRTIO_F_INDIRECT_DESC)
        dev.driver_features = bits | (indirect << S.VIRTIO_F_INDIRECT_DESC)
        assert dev._accept_features()
        assert dq.read.keep[3].indirect_ok == indirect  # the reader's native walker follows them


def vblock_null():
    import vblock

    return vblock.open_image(None, format="null", size=1 << 20)


def test_the_2_32_total_is_checked_natively():
    """A write whose buffers pass 2^32 bytes in total (2.7.5.2). The walker only computes
    offsets and reads the header, so a region that claims 16 GiB over 80 bytes is enough here."""
    ffi, lib = _binding.ffi, _binding.lib
    half = 1 << 31
    mem = bytearray(80)  # the table (4 entries), then the header at 64
    for i, (addr, length, flags) in enumerate(
        [(64, 16, NEXT), (80, half, NEXT), (80 + half, half - 17, NEXT), (0, 1, WRITE)]
    ):
        S.virtq_desc.pack_into(mem, 16 * i, addr, length, flags, i + 1 if flags & NEXT else 0)
    S.virtio_blk_req_hdr.pack_into(mem, 64, S.VIRTIO_BLK_T_OUT, 0, 0)
    out = ffi.new("uint64_t[]", 2 + 2 * 4)
    base = ffi.from_buffer("uint8_t[]", mem)
    w = ffi.new(
        "struct vring_split *",
        {
            "region": base,
            "region_gpa": 0,
            "region_len": 1 << 34,
            "table": base,
            "qsize": 4,
            "indirect_ok": 0,
            "indirect_max": 4,
            "out_max": 4,
            "out": out,
        },
    )
    assert lib.vring_blk_frame(w, 0) == lib.VRING_SLOW  # 2^32 bytes
    S.virtq_desc.pack_into(mem, 32, 80 + half, half - 18, NEXT, 3)  # 2^32 - 1 bytes: served
    assert lib.vring_blk_frame(w, 0) == 2 | S.VIRTIO_BLK_T_OUT << 16
    assert list(out[0:3]) == [0, (1 << 32) - 18, 0] and list(out[4:8]) == [
        80,
        80 + half,
        80 + half,
        2 * half - 18 + 80,
    ]


# -- buffers outside guest memory: answered in the status byte when it can be written -----------
OUTSIDE = st.sampled_from(
    [0, R0 - 1, R0 + REGION, R1 - 1, R1 + REGION, (1 << 64) - 8, (1 << 64) - 1]
)
CROSSING = st.sampled_from(
    [R0 + REGION - 1, R1 + REGION - 1, (1 << 64) - 1]
)  # with 2+ bytes: past an end


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_OUT]),
    st.integers(1, 3),
    st.data(),
    st.booleans(),
)
def test_a_buffer_outside_memory_is_ioerr_in_a_writable_status_else_unanswerable(
    kind, pieces, data, indirect
):
    """Any one descriptor of a standard request moved outside guest memory (or to wrap 2^64): IOERR
    in the status byte, no data buffer, used length 1 - unless the moved one is the status itself,
    which makes the frame unanswerable. The native reader and the reference agree."""
    mem = _memory()
    S.virtio_blk_req_hdr.pack_into(mem.view(R0 + 0x100, 16), 0, kind, 0, 8)
    data_flags = WRITE if kind == S.VIRTIO_BLK_T_IN else 0
    descs = [(R0 + 0x100, 16, 0)] + [
        (R0 + 0x1000 + 0x1000 * i, 512, data_flags) for i in range(pieces)
    ]
    descs.append((R0 + 0x200, 1, WRITE))
    moved = data.draw(st.integers(0, len(descs) - 1))
    addr, length, flags = descs[moved]
    if data.draw(st.booleans()):
        descs[moved] = (data.draw(OUTSIDE), length, flags)
    else:
        descs[moved] = (data.draw(CROSSING), max(length, 2), flags)
    entries = [
        (a, n, f | (NEXT if i + 1 < len(descs) else 0), i + 1 if i + 1 < len(descs) else 0)
        for i, (a, n, f) in enumerate(descs)
    ]
    if indirect:
        table = _place(
            mem, TABLE, [(INDIRECT_AT[0], 16 * len(entries), INDIRECT, 0)] + [(0, 0, 0, 0)] * 7
        )
        _place(mem, INDIRECT_AT[0], entries)
    else:
        table = _place(mem, TABLE, entries + [(0, 0, 0, 0)] * (8 - len(entries)))
    rules = RequestRules(CAPACITY)
    read = frame_reader(mem, table, 8, True, 8, rules)
    got = _outcome(read, 0)
    assert got == _outcome(lambda req: parse(req, walk(mem, table, 8, 0, True, 8), rules), 0)
    if moved == len(descs) - 1:
        assert got[0] == "ChainError"
    else:
        assert got[:3] == ("GuestError", got[1], S.VIRTIO_BLK_S_IOERR)
        assert got[3] == buffer_address(mem.view(R0 + 0x200, 1))

"""Property tests (hypothesis): random descriptor tables and ring contents never crash the device
and never make it write outside device-writable buffers; generated requests, encoded as chains in
random layouts, get the status an independent oracle predicts."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.virtio.virtio_helpers import FakeImage, Stack
from vblock.virtio import spec as S

MEM = 256 * 1024
POOL = 6  # guest buffers descriptors may point into
BUF = 1024

lengths = st.one_of(
    st.sampled_from([0, 1, 15, 16, 17, 20, 511, 512, 513, 1024]),
    st.integers(0, (1 << 32) - 1),
)


@st.composite
def descriptors(draw, qsize):
    where = draw(st.integers(0, 9))
    if where < POOL:
        addr = ("pool", where, draw(st.sampled_from([0, 0, 0, 16, 100])))
    elif where == POOL:
        addr = ("abs", draw(st.integers(0, (1 << 64) - 1)))
    elif where == POOL + 1:
        addr = ("abs", MEM - draw(st.integers(0, 600)))
    else:
        addr = ("table", where - POOL - 2)
    return addr, draw(lengths), draw(st.integers(0, 7)), draw(st.integers(0, qsize + 1))


@st.composite
def scenarios(draw):
    qsize = draw(st.sampled_from([4, 8]))
    table = draw(st.lists(descriptors(qsize), min_size=qsize, max_size=qsize))
    if draw(st.booleans()):
        # mostly well-formed chains (header, data, status) with a few fields broken
        table = []
        for i in range(qsize):
            pos = i % 3
            n = i + 1 if pos < 2 and i + 1 < qsize else 0
            flags = (1 if pos < 2 and i + 1 < qsize else 0) | (
                2 if pos == 2 or (pos == 1 and i % 2) else 0
            )
            table.append(((("pool", i % POOL, 0)), [16, 512, 1][pos], flags, n))
        for _ in range(draw(st.integers(0, 2))):
            i = draw(st.integers(0, qsize - 1))
            table[i] = draw(descriptors(qsize))
    tables = [draw(st.lists(descriptors(4), min_size=1, max_size=5)) for _ in range(2)]
    headers = [
        (
            draw(st.sampled_from([0, 1, 4, 8, 11, 13, 99])),
            draw(st.sampled_from([0, 1, 2047, 2048, (1 << 64) - 1])),
        )
        for _ in range(POOL)
    ]
    segs = draw(
        st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 64), st.integers(0, 3)), max_size=3)
    )
    starts = st.sampled_from([h for h in (0, 3, 6) if h < qsize])
    heads = draw(
        st.lists(
            st.one_of(starts, starts, starts, st.integers(0, qsize)), min_size=1, max_size=qsize + 2
        )
    )
    jump = draw(st.sampled_from([0, 0, 0, 0, 0, 1, qsize + 1, 40000]))
    return dict(
        qsize=qsize,
        table=table,
        tables=tables,
        headers=headers,
        segs=segs,
        heads=heads,
        jump=jump,
        indirect=draw(st.booleans()),
        event_idx=draw(st.booleans()),
    )


def _resolve(addr, pool, tabs):
    if addr[0] == "pool":
        return pool[addr[1]] + addr[2]
    if addr[0] == "table":
        return tabs[addr[1]]
    return addr[1]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_rings_never_crash_or_write_outside_writable_buffers(sc):
    img = FakeImage(size=1 << 20)
    stack = Stack(
        img,
        mem_size=MEM,
        queue_size=sc["qsize"],
        queue_size_max=8,
        indirect=sc["indirect"],
        event_idx=sc["event_idx"],
    )
    mem, drv = stack.mem, stack.drv
    dq = drv.queues[0]
    alloc = drv.allocator.alloc
    pool = [alloc(BUF) for _ in range(POOL)]
    tabs = [alloc(16 * 8) for _ in range(2)]
    seg_bytes = b"".join(S.virtio_blk_discard_write_zeroes.pack(*s) for s in sc["segs"])
    for addr, (t, sector) in zip(pool, sc["headers"]):
        mem.write(addr, bytes([0x3C]) * BUF)
        mem.write(addr, S.virtio_blk_req_hdr.pack(t, 0, sector) + seg_bytes)
    allowed = [(dq.used_addr, S.used_ring_bytes(dq.size))]
    for ti, entries in enumerate(sc["tables"]):
        view = mem.view(tabs[ti], 16 * len(entries))
        for i, (addr, ln, flags, nxt) in enumerate(entries):
            a = _resolve(addr, pool, tabs)
            S.virtq_desc.pack_into(view, 16 * i, a & ((1 << 64) - 1), ln, flags, nxt)
            if flags & S.VIRTQ_DESC_F_WRITE:
                allowed.append((a, ln))
    for i, (addr, ln, flags, nxt) in enumerate(sc["table"]):
        a = _resolve(addr, pool, tabs)
        if addr[0] == "table":
            ln = 16 * len(sc["tables"][addr[1]]) if ln % 3 else ln
        dq.write_desc(i, a & ((1 << 64) - 1), ln, flags, nxt)
        if flags & S.VIRTQ_DESC_F_WRITE and not flags & S.VIRTQ_DESC_F_INDIRECT:
            allowed.append((a, ln))
    for h in sc["heads"]:
        dq.push_head(h, publish=False)
    dq.set_avail_idx(dq.avail_idx + sc["jump"])
    before = mem.read(0, MEM)
    drv.notify(0)  # must not raise
    after = mem.read(0, MEM)
    for i in range(MEM):
        if before[i] != after[i]:
            assert any(a <= i < a + ln for a, ln in allowed), f"device wrote at {i:#x}"
    used = dq.reap_raw()
    for _, ln in used:
        event("answered in its status byte" if ln else "returned with used length 0")
    event("needs reset" if stack.dev.status & S.DEVICE_NEEDS_RESET else "serving")
    assert all(head < dq.size for head, _ in used)
    assert len(used) <= len(sc["heads"]) + sc["jump"]
    dev = stack.dev
    if not dev.status & S.DEVICE_NEEDS_RESET:
        # every published head was answered (inline backend), and the state is clean
        if sc["jump"] == 0:
            assert len(used) == len(sc["heads"])
        assert dev.in_flight() == 0


# -- request verdicts against an oracle ---------------------------------------------------------

CAP = (1 << 20) // 512


@st.composite
def requests(draw):
    t = draw(st.sampled_from([0, 1, 4, 8, 11, 13, 3]))
    sector = draw(st.sampled_from([0, 5, CAP - 8, CAP - 1, CAP, (1 << 64) - 1]))
    nbytes = draw(st.sampled_from([0, 1, 20, 511, 512, 1024, 4096]))
    segs = draw(
        st.lists(
            st.tuples(
                st.sampled_from([0, 8, CAP - 8, CAP]),
                st.sampled_from([0, 1, 8, 16]),
                st.sampled_from([0, 0, 1, 2]),
            ),
            min_size=1,
            max_size=3,
        )
    )
    return dict(
        t=t,
        sector=sector,
        nbytes=nbytes,
        segs=segs,
        pieces=draw(st.integers(1, 4)),
        merge=draw(st.booleans()),
        indirect=draw(st.booleans()),
        ro=draw(st.booleans()),
    )


def oracle(r):
    """The status 5.2.6 and our documented choices give (see blk_request.py)."""
    t, ro = r["t"], r["ro"]
    if t in (0, 1):
        n = r["nbytes"]
        if t == 1 and ro:
            return 1
        if n % 512 or r["sector"] > CAP or n // 512 > CAP - r["sector"]:
            return 1
        return 0
    if t == 4:
        return 0 if r["sector"] == 0 else 1
    if t == 8:
        return 0 if r["nbytes"] >= 20 else 1
    if t in (11, 13):
        for sector, num, flags in r["segs"]:
            if flags & ~1 or (t == 11 and flags & 1):
                return 2
            if sector > CAP or num > CAP - sector:
                return 1
        return 1 if ro else 0
    return 2


@settings(max_examples=200, deadline=None)
@given(requests())
def test_request_verdicts_match_the_oracle(r):
    img = FakeImage(size=1 << 20)
    stack = Stack(
        img, indirect=True, read_only=True if r["ro"] else None, mem_size=1 << 20, queue_size=16
    )
    drv = stack.drv
    t = r["t"]
    kw = dict(indirect=r["indirect"], merge=r["merge"], pieces=r["pieces"])
    if t in (0, 8):
        req = drv._run(t, r["sector"], read_len=r["nbytes"], **kw)
    elif t == 1:
        req = drv._run(
            t,
            r["sector"],
            data=bytes(range(256)) * (r["nbytes"] // 256) + bytes(r["nbytes"] % 256),
            **kw,
        )
    elif t in (11, 13):
        from vblock.virtio.driver import encode_segments

        req = drv._run(t, 0, data=encode_segments(r["segs"]), **kw)
    else:
        req = drv._run(t, r["sector"], **kw)
    expected = oracle(r)
    assert req.status == expected, (r, req.status)
    if expected:
        assert req.used_len == 1
    written = [op for op in img.ops if op[0] in ("write", "discard", "write_zeroes")]
    if expected or t not in (1, 11, 13):
        assert written == []


# -- packed rings ---------------------------------------------------------------------------------
@st.composite
def packed_scenarios(draw):
    qsize = draw(st.sampled_from([3, 4, 8]))
    flag_bits = st.lists(
        st.sampled_from([1, 2, 4, S.VIRTQ_DESC_F_AVAIL, S.VIRTQ_DESC_F_USED]), max_size=4
    )
    ring = []
    for _ in range(qsize):
        addr = draw(descriptors(4))[0]
        if draw(st.booleans()):  # mostly available, mostly chained sensibly
            flags = S.VIRTQ_DESC_F_AVAIL | draw(st.sampled_from([0, 1, 1, 2, 3]))
        else:
            flags = sum(set(draw(flag_bits)))
        ring.append((addr, draw(lengths), draw(st.integers(0, qsize + 1)), flags))
    tables = [draw(st.lists(descriptors(4), min_size=1, max_size=5)) for _ in range(2)]
    headers = [
        (draw(st.sampled_from([0, 1, 4, 8, 11, 13, 99])), draw(st.sampled_from([0, 1, 2048])))
        for _ in range(POOL)
    ]
    return dict(
        qsize=qsize,
        ring=ring,
        tables=tables,
        headers=headers,
        indirect=draw(st.booleans()),
        event_idx=draw(st.booleans()),
        driver_event=draw(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 3))),
    )


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(packed_scenarios())
def test_random_packed_rings_never_crash_or_write_outside_writable_buffers(sc):
    img = FakeImage(size=1 << 20)
    stack = Stack(
        img,
        mem_size=MEM,
        packed=True,
        queue_size=sc["qsize"],
        queue_size_max=8,
        indirect=sc["indirect"],
        event_idx=sc["event_idx"],
    )
    mem, drv = stack.mem, stack.drv
    dq = drv.queues[0]
    alloc = drv.allocator.alloc
    pool = [alloc(BUF) for _ in range(POOL)]
    tabs = [alloc(16 * 8) for _ in range(2)]
    for addr, (t, sector) in zip(pool, sc["headers"]):
        mem.write(addr, bytes([0x3C]) * BUF)
        mem.write(addr, S.virtio_blk_req_hdr.pack(t, 0, sector))
    allowed = [(dq.desc_addr, S.packed_ring_bytes(dq.size)), (dq.used_addr, 4)]
    for ti, entries in enumerate(sc["tables"]):
        view = mem.view(tabs[ti], 16 * len(entries))
        for i, (addr, ln, flags, _nxt) in enumerate(entries):
            a = _resolve(addr, pool, tabs)
            S.pvirtq_desc.pack_into(view, 16 * i, a & ((1 << 64) - 1), ln, 0, flags)
            if flags & S.VIRTQ_DESC_F_WRITE:
                allowed.append((a, ln))
    for i, (addr, ln, bid, flags) in enumerate(sc["ring"]):
        a = _resolve(addr, pool, tabs)
        if addr[0] == "table" and ln % 3:
            ln = 16 * len(sc["tables"][addr[1]])
        dq.write_pdesc(i, a & ((1 << 64) - 1), ln, bid, flags)
        if flags & S.VIRTQ_DESC_F_WRITE and not flags & S.VIRTQ_DESC_F_INDIRECT:
            allowed.append((a, ln))
    S.pvirtq_event_suppress.pack_into(dq.driver_event, 0, *sc["driver_event"])
    before = mem.read(0, MEM)
    drv.notify(0)  # must not raise
    after = mem.read(0, MEM)
    for i in range(MEM):
        if before[i] != after[i]:
            assert any(a <= i < a + ln for a, ln in allowed), f"device wrote at {i:#x}"
    dev = stack.dev
    q = dev.queue(0)
    event("needs reset" if dev.status & S.DEVICE_NEEDS_RESET else f"served {q.used_pos} positions")
    assert (
        q.used_pos <= q.avail_pos <= 2 * sc["qsize"]
    )  # random flags may look available for a lap more
    if not dev.status & S.DEVICE_NEEDS_RESET:
        assert dev.in_flight() == 0 and q.used_pos == q.avail_pos

"""The whole stack: driver -> VirtioMmio -> VirtioBlk -> a real image (memory, raw, QED), random
workloads checked against a model of the disk.

Requests in flight never overlap (each takes a distinct 8 KiB slot of the disk), so every read's
expected bytes are known when it is issued, whatever order completions come back in.
"""

from __future__ import annotations

import random

import pytest

import vblock
from tests.virtio.virtio_helpers import Stack
from vblock.virtio import spec as S

SLOT = 8192
SIZE = 4 << 20
IN, OUT, FLUSH, WZ = (
    S.VIRTIO_BLK_T_IN,
    S.VIRTIO_BLK_T_OUT,
    S.VIRTIO_BLK_T_FLUSH,
    S.VIRTIO_BLK_T_WRITE_ZEROES,
)


@pytest.fixture
def open_backend(scratch):
    opened = []

    def make(kind, size=SIZE):
        if kind == "memory":
            img = vblock.open_image(None, format="memory", size=size)
        else:
            path = scratch / f"disk.{kind}"
            vblock.create_image(path, kind, size).close()
            img = vblock.open_image(path, format=kind)
        opened.append(img)
        return img

    yield make
    for img in opened:
        img.close()


def run_workload(stack, nreq, seed, depth=16, indirect_share=0.5):
    """``nreq`` random requests, at most ``depth`` in flight, verified against a model."""
    rng = random.Random(seed)
    drv = stack.drv
    size = stack.img.size
    model = bytearray(size)
    nslots = size // SLOT
    busy = set()
    expect = {}
    submitted = completed = 0
    counts = {IN: 0, OUT: 0, FLUSH: 0, WZ: 0}
    while completed < nreq:
        while submitted < nreq and drv.in_flight() < depth:
            slot = rng.randrange(nslots)
            if slot in busy:
                continue
            dq = max(drv.queues, key=lambda q: q.room())
            roll = rng.random()
            t = IN if roll < 0.4 else OUT if roll < 0.85 else WZ if roll < 0.93 else FLUSH
            first = rng.randrange(16)
            nsec = rng.randint(1, 16 - first)
            sector = slot * 16 + first
            nbytes = nsec * 512
            indirect = drv.indirect and rng.random() < indirect_share
            pieces = 1 if t == WZ else rng.randint(1, 4)
            merge = rng.random() < 0.3
            need = 1 if indirect else pieces + 2 - merge
            if not indirect and need > dq.size:
                pieces, merge, need = 1, True, 2
            if t == FLUSH:
                need = 1 if indirect else 2
            if dq.room() < need:
                if drv.in_flight():
                    break
                continue
            kw = dict(queue=dq.index, kick=False, indirect=indirect, pieces=pieces, merge=merge)
            if t == IN:
                req = drv.submit(IN, sector, read_len=nbytes, **kw)
                expect[id(req)] = bytes(model[sector * 512 : sector * 512 + nbytes])
            elif t == OUT:
                data = rng.randbytes(nbytes)
                model[sector * 512 : sector * 512 + nbytes] = data
                req = drv.submit(OUT, sector, data=data, **kw)
            elif t == WZ:
                unmap = rng.random() < 0.5
                model[sector * 512 : sector * 512 + nbytes] = bytes(nbytes)
                seg = S.virtio_blk_discard_write_zeroes.pack(sector, nsec, int(unmap))
                req = drv.submit(WZ, 0, data=seg, **kw)
            else:
                req = drv.submit(FLUSH, 0, queue=dq.index, kick=False, indirect=indirect)
            req.sector = slot
            if t != FLUSH:
                busy.add(slot)
            counts[t] += 1
            submitted += 1
        drv.kick()
        for req in drv.wait_any():
            completed += 1
            assert req.status == S.VIRTIO_BLK_S_OK, (req, req.used_len)
            if req.type == IN:
                assert req.used_len == len(req.data) + 1
                assert req.data == expect.pop(id(req))
            else:
                assert req.used_len == 1
            if req.type != FLUSH:
                busy.discard(req.sector)
    assert drv.in_flight() == 0
    # everything the model holds is on the disk, read back through the device
    for off in range(0, size, 64 * 1024):
        status, data = drv.read(off // 512, 64 * 1024, indirect=False, merge=True)
        assert status == 0 and data == bytes(model[off : off + 64 * 1024]), off
    return counts


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("num_queues", [1, 4])
def test_random_workload_memory_backend(open_backend, event_idx, indirect, num_queues):
    st = Stack(
        open_backend("memory"),
        event_idx=event_idx,
        indirect=indirect,
        num_queues=num_queues,
        queue_size=64,
    )
    counts = run_workload(st, 1500, seed=num_queues * 4 + event_idx * 2 + indirect)
    assert min(counts.values()) > 0
    assert st.dev.in_flight() == 0


@pytest.mark.parametrize("queue_size", [2, 4, 16, 128, 1024])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_random_workload_queue_sizes(open_backend, queue_size, indirect):
    st = Stack(
        open_backend("memory"), indirect=indirect, queue_size=queue_size, queue_size_max=1024
    )
    assert st.drv.queues[0].size == queue_size
    run_workload(st, 600, seed=queue_size, depth=min(queue_size, 32))


@pytest.mark.parametrize("queue_size", [2, 3, 5, 64, 100, 256])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_random_workload_packed_rings(open_backend, queue_size, event_idx, indirect):
    st = Stack(
        open_backend("memory"),
        packed=True,
        event_idx=event_idx,
        indirect=indirect,
        queue_size=queue_size,
        queue_size_max=256,
    )
    assert st.drv.packed and st.dev.queue(0).packed and st.drv.queues[0].size == queue_size
    run_workload(st, 500, seed=queue_size + 7 * event_idx, depth=min(queue_size, 24))


@pytest.mark.parametrize("kind", ["raw", "qed"])
def test_random_workload_packed_rings_file_backends(open_backend, kind):
    st = Stack(
        open_backend(kind), packed=True, event_idx=True, indirect=True, num_queues=2, queue_size=48
    )
    run_workload(st, 600, seed=3, depth=24)


def test_packed_ring_wraps_many_laps(open_backend):
    st = Stack(open_backend("memory", size=1 << 20), packed=True, queue_size=7, queue_size_max=8)
    drv = st.drv
    bufs = [drv.allocator.alloc(512) for _ in range(2)]
    for n in range(3000):  # 2 requests of 3 descriptors per round on a ring of 7
        reqs = [
            drv.submit(OUT, (2 * n + i) % 2048, buffers=[(bufs[i], 512)], kick=False)
            for i in range(2)
        ]
        drv.kick()
        assert [r.status for r in drv.reap()] == [0, 0] and all(r.done for r in reqs)
    q = st.dev.queue(0)
    assert q.avail_pos == q.used_pos == 3000 * 6 and drv.queues[0].num_free == 7


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_ring_indices_wrap_past_65536(open_backend, event_idx):
    """More than 65536 requests on one queue: avail and used indices wrap at 2^16."""
    st = Stack(open_backend("memory", size=1 << 20), event_idx=event_idx, queue_size=256)
    drv = st.drv
    dq = drv.queues[0]
    bufs = [drv.allocator.alloc(512) for _ in range(32)]
    total = 66000
    done = 0
    n = 0
    while done < total:
        k = min(32, total - n)
        for i in range(k):
            drv.submit(OUT, (n + i) % 2048, buffers=[(bufs[i], 512)], kick=False)
        n += k
        drv.kick()
        got = drv.reap()
        assert all(r.status == 0 for r in got)
        done += len(got)
    assert dq.avail_idx == total % 65536 and dq.last_used == total % 65536
    assert st.dev.queue(0).next_used == total % 65536


@pytest.mark.parametrize("kind", ["raw", "qed"])
@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
@pytest.mark.parametrize("num_queues", [1, 4])
def test_random_workload_file_backends(open_backend, kind, event_idx, indirect, num_queues):
    st = Stack(
        open_backend(kind),
        event_idx=event_idx,
        indirect=indirect,
        num_queues=num_queues,
        queue_size=32,
    )
    counts = run_workload(st, 500, seed=7 + num_queues, depth=24)
    assert counts[IN] and counts[OUT]


def test_workload_with_native_fences(open_backend):
    """The shared-memory configuration: hostio's CPU fences at the four ordering points."""
    from vblock.virtio import queue

    queue.use_native_fences()
    try:
        assert queue.full_fence is not queue._no_fence
        st = Stack(open_backend("raw"), event_idx=True, indirect=True, queue_size=64)
        run_workload(st, 300, seed=5, depth=16)
    finally:
        queue.use_native_fences(False)
    assert queue.full_fence is queue._no_fence


def test_capacity_follows_image_resize(open_backend):
    img = open_backend("raw", size=1 << 20)
    st = Stack(img)
    cap = st.drv.capacity
    assert cap == (1 << 20) // 512 and st.drv.write(cap, b"g" * 512) == S.VIRTIO_BLK_S_IOERR
    img.resize(2 << 20)
    assert st.drv.capacity == (2 << 20) // 512  # the config read notices the new size
    assert st.drv.config_interrupts == 1
    assert st.drv.write(cap, b"g" * 512) == 0 and st.drv.read(cap, 512) == (0, b"g" * 512)


def test_get_id_and_flush_through_raw(open_backend):
    st = Stack(open_backend("raw"), serial="disk-serial-1234567890")
    assert st.drv.get_id() == (0, b"disk-serial-12345678")
    assert st.drv.flush() == 0

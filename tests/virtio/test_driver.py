"""The guest-side driver is test equipment others rely on (our mock.rs): its own tests."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.virtio.test_stack import run_workload
from tests.virtio.virtio_helpers import FakeImage, Stack
from vblock.future import Future
from vblock.virtio import spec as S
from vblock.virtio.driver import DriverError, GuestAllocator


def test_allocator_classes_alignment_and_reuse():
    a = GuestAllocator(0x1000, 1 << 20)
    x = a.alloc(100)  # class 128
    y = a.alloc(8192)
    assert x % 128 == 0 and y % 4096 == 0 and y >= x + 128
    a.free(x, 100)
    assert a.alloc(128) == x
    with pytest.raises(MemoryError):
        a.alloc(2 << 20)


@pytest.mark.parametrize("pieces", [1, 2, 5, [100, 412, 512]])
@pytest.mark.parametrize("merge", [False, True])
@pytest.mark.parametrize("indirect", [False, True])
def test_layouts_reach_the_device_as_the_same_request(pieces, merge, indirect):
    st = Stack(FakeImage(), indirect=True)
    data = bytes(range(256)) * 4
    req = st.drv.submit(
        S.VIRTIO_BLK_T_OUT, 2, data=data, pieces=pieces, merge=merge, indirect=indirect
    )
    st.drv.wait([req])
    assert req.status == 0 and st.img.data[1024:2048] == data
    r = st.drv._run(
        S.VIRTIO_BLK_T_IN, 2, read_len=1024, pieces=pieces, merge=merge, indirect=indirect
    )
    assert (r.status, r.data, r.used_len) == (0, data, 1025)
    nd = 1 if indirect else (len(pieces) if isinstance(pieces, list) else pieces) + 2 - merge
    assert len(r.descs) == nd


def test_descriptor_exhaustion_is_reported_and_recovered():
    st = Stack(FakeImage(defer=True), queue_size=4)
    drv = st.drv
    drv.submit(S.VIRTIO_BLK_T_OUT, 0, data=b"a" * 512)
    with pytest.raises(DriverError, match="descriptors needed"):
        drv.submit(S.VIRTIO_BLK_T_OUT, 1, data=b"b" * 512)
    st.img.complete()
    drv.wait()
    assert len(drv.queues[0].free) == 4
    req = drv.submit(S.VIRTIO_BLK_T_OUT, 1, data=b"b" * 512)
    st.img.complete()
    drv.wait([req])
    assert req.status == 0 and st.img.data[512:1024] == b"b" * 512


def test_a_queue_turn_reaches_the_image_in_one_batch():
    """Everything one kick makes available is submitted inside one ``Image.batch()``, so the
    host sees the turn's requests in one system call."""
    st = Stack(FakeImage())
    drv = st.drv
    reqs = [drv.post(S.VIRTIO_BLK_T_OUT, 8 * i, drv.allocator.alloc(4096), 4096) for i in range(8)]
    drv.kick()
    drv.wait(reqs)
    assert [r.status for r in reqs] == [0] * 8
    assert None not in st.img.batched and len(set(st.img.batched)) == 1  # all in one batch


def test_post_fast_path_matches_submit():
    st = Stack(FakeImage())
    drv = st.drv
    buf = drv.allocator.alloc(4096)
    st.mem.write(buf, b"p" * 4096)
    r = drv.post(S.VIRTIO_BLK_T_OUT, 8, buf, 4096)
    drv.kick()
    drv.wait([r])
    assert r.status == 0 and st.img.data[4096:8192] == b"p" * 4096
    r = drv.post(S.VIRTIO_BLK_T_IN, 0, buf, 4096)
    from vblock.virtio.driver import Request

    assert all(
        hasattr(r, name) for name in Request.__slots__
    )  # post() skips __init__: it sets every field
    drv.kick()
    drv.wait([r])
    assert (r.status, r.used_len) == (0, 4097) and st.mem.read(buf, 4096) == bytes(4096)


class PoolImage(FakeImage):
    """Completes every request on one of several worker threads, in whatever order they run."""

    def __init__(self, size, workers=4):
        super().__init__(size=size)
        self.pool = ThreadPoolExecutor(workers)

    def _finish(self, name, action):
        fut = Future()

        def run():
            try:
                fut.set_result(action())
            except Exception as exc:  # pragma: no cover - surfaced through the status check
                fut.set_exception(exc)

        self.pool.submit(run)
        return fut


@pytest.mark.parametrize("event_idx", [False, True], ids=["flags", "event_idx"])
def test_completions_from_many_threads(event_idx):
    """Completions race in from four threads while the driver keeps posting: the combining
    publisher must lose none and publish each exactly once."""
    img = PoolImage(4 << 20)
    try:
        st = Stack(img, event_idx=event_idx, indirect=True, num_queues=2, queue_size=64)
        run_workload(st, 3000, seed=11, depth=48)
        assert st.dev.in_flight() == 0
        for i in range(2):
            q = st.dev.queue(i)
            assert q.next_used == st.drv.queues[i].last_used
    finally:
        img.pool.shutdown()

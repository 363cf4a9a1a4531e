"""The alignment helpers: addresses, aligned buffers, the pool and the range lock."""

from vblock.future import Future
from vblock.block.bounce import BufferPool, RangeLock, address_of, aligned_buffer


def test_aligned_buffer_is_aligned_zeroed_and_sized():
    for alignment in (512, 4096, 65536):
        buf = aligned_buffer(10000, alignment)
        assert len(buf) == 10000
        assert address_of(buf) % alignment == 0
        assert bytes(buf) == bytes(10000)
        assert not buf.readonly


def test_address_of_read_only_buffers():
    data = b"x" * 100
    mv = memoryview(data)
    assert address_of(mv[1:]) == address_of(mv) + 1


def test_pool_recycles_by_size_class():
    pool = BufferPool(512)
    a = pool.get(5000)
    assert len(a) == 5000 and address_of(a) % 4096 == 0
    pool.put(a)
    b = pool.get(8000)  # same 8 KiB class
    assert address_of(b) == address_of(a)
    big = pool.get(pool.max_pooled + 1)
    assert len(big) == pool.max_pooled + 1


def test_shared_entries_do_not_wait_for_each_other():
    rl = RangeLock()
    t1 = rl.try_shared(0, 4096)
    t2 = rl.try_shared(0, 4096)
    assert t1 is not None and t2 is not None and t1 != t2
    rl.release(t1)
    rl.release(t2)
    assert not rl.busy


def test_exclusive_waits_for_overlapping_shared_and_blocks_newcomers():
    rl = RangeLock()
    started = []
    shared = rl.try_shared(0, 1024)
    assert rl.acquire(512, 1536, True, lambda t: started.append(("x", t))) is None
    # while the exclusive entry waits, the fast path is closed and overlapping shared ones queue
    assert rl.try_shared(4096, 8192) is None
    assert rl.acquire(1024, 2048, False, lambda t: started.append(("s", t))) is None
    far = rl.acquire(8192, 9000, False, lambda t: started.append(("far", t)))
    assert far is not None  # no overlap: granted at once
    assert started == []
    rl.release(shared)
    assert [k for k, _ in started] == ["x"]
    rl.release(started[0][1])
    assert [k for k, _ in started] == ["x", "s"]
    rl.release(started[1][1])
    rl.release(far)
    assert not rl.busy


def test_non_overlapping_exclusive_entries_run_together():
    rl = RangeLock()
    a = rl.acquire(0, 512, True, None)
    b = rl.acquire(512, 1024, True, None)
    assert a is not None and b is not None
    rl.release(a)
    rl.release(b)
    assert rl.try_shared(0, 1024) is not None


def test_waiters_keep_arrival_order_per_range():
    rl = RangeLock()
    order = []
    first = rl.acquire(0, 512, True, None)
    for name in "abc":
        assert rl.acquire(0, 512, True, lambda t, n=name: order.append((n, t))) is None
    rl.release(first)
    rl.release(order[-1][1])
    rl.release(order[-1][1])
    assert [n for n, _ in order] == ["a", "b", "c"]


def test_exclusive_waits_for_a_plain_write_in_flight():
    rl = RangeLock()
    started = []
    slot = rl.begin_plain(0, 4096)
    fut = Future()
    rl.plain_submitted(slot, fut)
    assert rl.acquire(512, 1024, True, started.append) is None
    assert rl.begin_plain(8192, 12288) is None  # fast path closed while the exclusive one waits
    assert started == []
    fut.set_result(4096)  # the write completes: the waiting exclusive entry starts
    assert len(started) == 1
    rl.release(started[0])
    assert rl.begin_plain(0, 4096) is not None


def test_exclusive_arriving_during_submission_is_started_by_the_submitter():
    rl = RangeLock()
    started = []
    slot = rl.begin_plain(0, 4096)  # registered, future not stored yet
    assert rl.acquire(0, 512, True, started.append) is None
    assert slot[3] is True  # watched
    fut = Future()
    rl.plain_submitted(slot, fut)  # attaches the completion hook because the slot is watched
    assert started == []
    fut.set_result(4096)
    assert len(started) == 1


def test_finished_plain_writes_do_not_block_and_are_swept():
    rl = RangeLock()
    for i in range(200):
        slot = rl.begin_plain(0, 4096)
        f = Future()
        f.set_result(4096)
        rl.plain_submitted(slot, f)
    assert len(rl._plain) < RangeLock._PRUNE_AT
    token = rl.acquire(0, 4096, True, None)
    assert token is not None  # done plain writes never make an exclusive entry wait
    rl.release(token)
    assert not rl.busy


def test_failed_submission_frees_the_slot():
    rl = RangeLock()
    started = []
    slot = rl.begin_plain(0, 4096)
    assert rl.acquire(0, 4096, True, started.append) is None
    rl.plain_failed(slot)
    assert len(started) == 1

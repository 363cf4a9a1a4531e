"""vblock.future: the completion type and the few ways layers compose it."""

import asyncio
import concurrent.futures
import threading
from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION

import pytest

import vblock
from vblock.future import (
    Future,
    begin_completions,
    completed,
    defer,
    end_completions,
    failed,
    followed_by,
    join,
    settle,
    then,
)
from vblock.hostio import HostFile, alloc_buffer


def test_callbacks_run_once_with_the_outcome():
    f = Future()
    seen = []
    f.add_done_callback(lambda x: seen.append(x.result()))
    f.set_result(5)
    f.add_done_callback(lambda x: seen.append(x.result() * 2))  # already done: runs at once
    assert seen == [5, 10]
    with pytest.raises(RuntimeError):
        f.set_result(6)


def test_result_waits_for_another_thread():
    f = Future()
    t = threading.Thread(target=f.set_result, args=(42,))
    t.start()
    assert f.result(timeout=10) == 42
    t.join()


def test_join_sums_or_reports_the_first_failure():
    assert join([completed(3), completed(4)]).result() == 7
    assert join([completed(3), completed(4)], None).result() is None
    boom = OSError(5, "boom")
    assert join([completed(1), failed(boom), failed(ValueError())]).exception() is boom
    single = completed(9)
    assert join([single]) is single


def test_then_runs_only_after_success_and_forwards_futures():
    assert then(completed(1), lambda: completed("x")).result() == "x"
    calls = []
    err = ValueError("no")
    out = then(failed(err), calls.append, 1)
    assert out.exception() is err and calls == []


def test_settle_may_recover_from_a_failure():
    out = settle(
        failed(OSError(95, "unsupported")), lambda f: "fallback" if f.exception() else "ok"
    )
    assert out.result() == "fallback"


def test_followed_by_keeps_the_first_result_and_fails_with_the_second():
    assert followed_by(completed(4096), lambda: completed(None)).result() == 4096
    err = OSError(5, "flush failed")
    assert followed_by(completed(4096), lambda: failed(err)).exception() is err


def test_deferred_work_runs_once_per_batch():
    calls = []
    defer(calls.append, "now")  # outside a batch: at once
    assert calls == ["now"]
    begin_completions()
    for _ in range(3):
        defer(calls.append, "batched")
    assert calls == ["now"]
    end_completions()
    assert calls == ["now", "batched"]


# -- the standard protocols: concurrent.futures and asyncio -------------------------------------


def test_future_is_a_concurrent_futures_future():
    assert isinstance(Future(), concurrent.futures.Future)
    assert isinstance(completed(1), concurrent.futures.Future)


def test_concurrent_wait_returns_when_the_first_completes_on_another_thread():
    futures = [Future() for _ in range(3)]
    t = threading.Thread(target=futures[1].set_result, args=(7,))
    t.start()
    done, not_done = concurrent.futures.wait(futures, timeout=60, return_when=FIRST_COMPLETED)
    t.join()
    assert done == {futures[1]} and not_done == {futures[0], futures[2]}


def test_concurrent_wait_all_completed_sees_results_and_failures():
    futures = [Future() for _ in range(4)]
    boom = OSError(5, "boom")

    def finish():
        futures[0].set_result(1)
        futures[2].set_exception(boom)
        futures[1].set_result(2)
        futures[3].set_result(3)

    t = threading.Thread(target=finish)
    t.start()
    done, not_done = concurrent.futures.wait(futures, timeout=60, return_when=ALL_COMPLETED)
    t.join()
    assert done == set(futures) and not not_done
    assert futures[2].exception() is boom


def test_concurrent_wait_first_exception_stops_at_the_failure():
    futures = [Future() for _ in range(3)]
    t = threading.Thread(target=futures[2].set_exception, args=(ValueError("bad"),))
    t.start()
    done, not_done = concurrent.futures.wait(futures, timeout=60, return_when=FIRST_EXCEPTION)
    t.join()
    assert done == {futures[2]} and len(not_done) == 2


def test_as_completed_yields_done_futures_first_then_in_completion_order():
    futures = [Future() for _ in range(4)]
    futures[3].set_result("early")
    order = [2, 0, 1]

    def finish():
        for i in order:
            futures[i].set_result(i)

    seen = []
    it = concurrent.futures.as_completed(futures, timeout=60)
    seen.append(next(it))  # the one done before as_completed started
    t = threading.Thread(target=finish)
    t.start()
    seen.extend(it)
    t.join()
    assert seen == [futures[3], futures[2], futures[0], futures[1]]


def test_asyncio_wrap_future_delivers_result_and_exception():
    ok, bad = Future(), Future()
    err = OSError(5, "eio")

    async def main():
        loop = asyncio.get_running_loop()
        loop.call_soon(threading.Thread(target=ok.set_result, args=(11,)).start)
        loop.call_soon(threading.Thread(target=bad.set_exception, args=(err,)).start)
        got = await asyncio.wrap_future(ok)
        with pytest.raises(OSError) as info:
            await asyncio.wrap_future(bad)
        return got, info.value

    assert asyncio.run(main()) == (11, err)


def test_await_a_future_in_a_coroutine_done_or_pending():
    pending = Future()

    async def main():
        first = await completed("now")
        threading.Thread(target=pending.set_result, args=("later",)).start()
        second = await pending
        with pytest.raises(ValueError):
            await failed(ValueError("no"))
        return first, second

    assert asyncio.run(main()) == ("now", "later")


def test_a_coroutine_awaits_64_requests_over_qed(scratch):
    """HostFile, Image and driver futures alike: 64 writes and 64 reads through a QED image."""
    path = str(scratch / "aio.qed")
    vblock.create_image(path, "qed", 4 << 20).close()
    img = vblock.open_image(path, format="qed")
    try:
        bufs = [alloc_buffer(4096) for _ in range(64)]
        for i, b in enumerate(bufs):
            memoryview(b)[:] = bytes([i + 1]) * 4096
        back = [alloc_buffer(4096) for _ in range(64)]

        async def main():
            writes = [img.submit_write(i * 65536, [memoryview(b)]) for i, b in enumerate(bufs)]
            assert all(isinstance(w, concurrent.futures.Future) for w in writes)
            await asyncio.gather(*(asyncio.wrap_future(w) for w in writes))
            await img.submit_flush()
            return [await img.submit_read(i * 65536, [memoryview(b)]) for i, b in enumerate(back)]

        results = asyncio.run(main())
        assert results == [4096] * 64
        assert [bytes(memoryview(b)) for b in back] == [bytes([i + 1]) * 4096 for i in range(64)]
    finally:
        img.close()


def test_hostfile_futures_work_with_concurrent_wait(scratch):
    path = scratch / "host.raw"
    path.write_bytes(b"\x07" * 65536)
    hf = HostFile(str(path))
    try:
        bufs = [alloc_buffer(4096) for _ in range(8)]
        futures = [hf.submit_read(i * 4096, [memoryview(b)]) for i, b in enumerate(bufs)]
        done, not_done = concurrent.futures.wait(futures, timeout=60)
        assert len(done) == 8 and not not_done
        assert [f.result() for f in futures] == [4096] * 8
    finally:
        hf.close()

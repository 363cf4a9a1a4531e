"""vblock.future: the completion type and the few ways layers compose it."""

import threading

import pytest

from vblock.future import (Future, begin_completions, completed, defer, end_completions, failed,
                           followed_by, join, settle, then)


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
    out = settle(failed(OSError(95, "unsupported")), lambda f: "fallback" if f.exception() else "ok")
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

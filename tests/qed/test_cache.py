"""L2 cache states and eviction (drivers/qed/cache.py)."""

import threading

import pytest

from vblock.drivers.qed import cache as c


def _cache(n=2):
    return c.L2Cache(n, threading.Lock())


def _load(cache, off):
    e, must = cache.acquire(off)
    assert must
    cache.loaded(e, [off])
    return e


def test_every_transition_and_illegal_ones():
    for (state, event), nxt in c.TRANSITIONS.items():
        e = c.Entry(0, state) if state is not None else None
        assert c.L2Cache.move(e, event, state) == nxt
    with pytest.raises(c.IllegalTransition):
        c.L2Cache.move(c.Entry(0, c.LOADING), "evict")
    with pytest.raises(c.IllegalTransition):
        c.L2Cache.move(c.Entry(0, c.CLEAN), "write_start")
    with pytest.raises(c.IllegalTransition):
        c.L2Cache.move(c.Entry(0, c.WRITING), "evict")


def test_miss_then_hit_and_peek():
    cache = _cache()
    assert cache.peek(4096) is None
    e, must = cache.acquire(4096)
    assert must and e.state == c.LOADING
    assert cache.peek(4096) is None  # not final while loading
    e2, must2 = cache.acquire(4096)
    assert e2 is e and not must2 and e.holders == 2
    cache.loaded(e, [1]).set_result(None)
    assert c.wait_loaded(e2) == [1]
    assert cache.peek(4096) == [1]


def test_lru_eviction_skips_held_and_busy_entries():
    cache = _cache(2)
    a = _load(cache, 1)
    b = _load(cache, 2)
    cache.release(b)
    cache.peek(2)
    # a is held; inserting c pushes the count over: b (idle, clean) goes
    x = _load(cache, 3)
    assert 2 not in cache and 1 in cache and 3 in cache
    cache.release(a)
    cache.release(x)
    cache.peek(1)  # 3 is now least recently used
    _load(cache, 4)
    assert 3 not in cache and 1 in cache


def test_cache_grows_when_everything_is_in_use_and_shrinks_back():
    cache = _cache(1)
    a = _load(cache, 1)
    b = _load(cache, 2)
    assert len(cache) == 2
    d = cache.create(3, [0], 0)  # a new table, DIRTY
    assert len(cache) == 3
    cache.release(a)
    cache.release(b)
    assert len(cache) == 1 and 3 in cache  # the dirty new table stays
    cache.release(d)
    assert d.state == c.DIRTY and 3 in cache


def test_failed_load_removes_entry():
    cache = _cache()
    e, _ = cache.acquire(7)
    fut = cache.load_failed(e)
    fut.set_exception(OSError(5, "EIO"))
    assert 7 not in cache
    with pytest.raises(OSError):
        c.wait_loaded(e)


def test_release_too_often():
    cache = _cache()
    e = _load(cache, 1)
    cache.release(e)
    with pytest.raises(c.IllegalTransition):
        cache.release(e)

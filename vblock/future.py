"""A small, thread-safe future: the completion object every vblock layer returns.

It is a ``concurrent.futures.Future`` (a subclass), so it works everywhere the standard one does:
``concurrent.futures.wait`` and ``as_completed``, ``asyncio.wrap_future``, and ``await fut``
inside a coroutine (the coroutine resumes on its event loop's thread). It reimplements the
methods vblock's callers use (``result``, ``exception``, ``done``, ``add_done_callback``,
``set_result``, ``set_exception``, ``cancel``/``cancelled``) at a fraction of the standard
class's cost: it builds no condition variable, lock or list per future; a thread that waits gets
an event made on demand, and the standard waiters of ``wait`` / ``as_completed`` are kept in a
list made on demand, under one lock shared by every future (``_condition`` is that lock, so the
standard functions see a consistent state). That matters at tens of thousands of requests per
second.

Threads: a future may be completed from any thread (usually an engine's completion thread or a
driver's pool thread). Callbacks run in the thread that completes the future, or immediately in the
thread that adds them if the future is already done. A callback must not block; an exception it
raises is logged and swallowed, as in ``concurrent.futures``. Requests are never withdrawn once
submitted, so ``cancel()`` always returns False.
"""

from __future__ import annotations

import concurrent.futures as _cf
import logging
import threading
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as _FutureTimeout
from concurrent.futures._base import FINISHED as _DONE
from concurrent.futures._base import PENDING as _PENDING
from typing import Any

__all__ = [
    "Future",
    "completed",
    "failed",
    "CancelledError",
    "defer",
    "begin_completions",
    "end_completions",
    "forward",
    "resolve",
    "then",
    "settle",
    "followed_by",
    "join",
]

_log = logging.getLogger(__name__)
# Guards _state/_callbacks/_event/_waiter_list of every Future; held for a few bytecodes.
# Re-entrant because concurrent.futures.wait acquires the ``_condition`` of each future it is
# given in turn, and here they are all this one lock.
_lock = threading.RLock()

_completing = threading.local()  # .deferred: {(fn, arg): None} while a batch of completions runs


class Future(_cf.Future):
    """The outcome of one operation, delivered once from any thread (see the module doc)."""

    __slots__ = ("_state", "_result", "_exc", "_callbacks", "_event", "_waiter_list")

    def __init__(self) -> None:
        # The standard __init__ is not called: it builds a Condition per future.
        self._state = _PENDING
        self._result = None
        self._exc = None
        self._callbacks = None
        self._event = None
        self._waiter_list = None

    # What concurrent.futures.wait / as_completed use: the lock that guards ``_state`` and the
    # list of waiters they install (both read and written only while holding it).
    @property
    def _condition(self):
        return _lock

    @property
    def _waiters(self):
        waiters = self._waiter_list
        if waiters is None:
            waiters = self._waiter_list = []
        return waiters

    # -- producer side ---------------------------------------------------------------------------
    def _finish(self, result: Any, *, exc: BaseException | None = None) -> None:
        with _lock:
            if self._state is _DONE:
                raise RuntimeError("future completed twice")
            self._result = result
            self._exc = exc
            self._state = _DONE
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
            if self._waiter_list:
                for waiter in self._waiter_list:
                    if exc is None:
                        waiter.add_result(self)
                    else:
                        waiter.add_exception(self)
        if event is not None:
            event.set()
        if callbacks:
            for fn in callbacks:
                try:
                    fn(self)
                except Exception:  # pragma: no cover - mirrors concurrent.futures
                    _log.exception("exception calling callback for %r", self)

    set_result = _finish  # one call frame less on every request's completion

    def set_exception(self, exc: BaseException | None) -> None:
        self._finish(None, exc=exc)

    # -- consumer side ---------------------------------------------------------------------------
    def done(self) -> bool:
        return self._state is _DONE

    def running(self) -> bool:
        return self._state is _PENDING

    def cancel(self) -> bool:
        """Requests are never withdrawn once submitted; always ``False``."""
        return False

    def cancelled(self) -> bool:
        return False

    def add_done_callback(self, fn: Callable[[Future], object]) -> None:
        """Call ``fn(future)`` once it is done: on the thread that completes it, or at once on
        this thread if it is done already. ``fn`` must not block."""
        with _lock:
            if self._state is _PENDING:
                if self._callbacks is None:
                    self._callbacks = [fn]
                else:
                    self._callbacks.append(fn)
                return
        try:
            fn(self)
        except Exception:  # pragma: no cover
            _log.exception("exception calling callback for %r", self)

    def _wait(self, timeout):
        if self._state is _DONE:
            return
        with _lock:
            if self._state is _DONE:
                return
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        if not event.wait(timeout):
            raise _FutureTimeout()

    def result(self, timeout: float | None = None) -> Any:
        if self._state is not _DONE:
            self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state is not _DONE:
            self._wait(timeout)
        return self._exc

    def __await__(self) -> Generator[Any, None, Any]:
        """``await fut`` in a coroutine: the result, or the exception raised."""
        if self._state is _DONE:
            return self.result()
        import asyncio

        return (yield from asyncio.wrap_future(self).__await__())

    def __repr__(self) -> str:
        if self._state is not _DONE:
            return "<Future pending>"
        if self._exc is not None:
            return f"<Future failed {self._exc!r}>"
        return f"<Future done {self._result!r}>"


def completed(result: Any = None) -> Future:
    """A future that is already done with ``result``."""
    fut = Future()
    fut._state = _DONE
    fut._result = result
    return fut


def failed(exc: BaseException) -> Future:
    """A future that is already done with the exception ``exc``."""
    fut = Future()
    fut._state = _DONE
    fut._exc = exc
    return fut


# -- once-per-batch work ----------------------------------------------------------------------------


def defer(fn: Callable[[Any], object], arg: Any) -> None:
    """Run ``fn(arg)`` once the current batch of completions is over, or now outside one.

    An engine completes futures in batches on one of its threads (``begin_completions`` ...
    ``end_completions``). Work that is cheaper done once per batch than once per completion
    (publishing a virtqueue's used index and raising its interrupt) goes through ``defer``: inside
    a batch, equal ``(fn, arg)`` pairs collapse into one call made after the batch's last
    callback; anywhere else ``fn(arg)`` runs at once. ``fn`` must not block.
    """
    pending = getattr(_completing, "deferred", None)
    if pending is None:
        fn(arg)
    else:
        pending[(fn, arg)] = None


def begin_completions() -> None:
    """The calling thread starts completing a batch of futures (see ``defer``)."""
    _completing.deferred = {}


def end_completions() -> None:
    """The batch is over: run the deferred work (and what it defers in turn)."""
    pending = _completing.deferred
    while pending:
        _completing.deferred = {}
        for fn, arg in pending:
            try:
                fn(arg)
            except Exception:  # pragma: no cover - a bug in the deferred work
                _log.exception("deferred completion work %r failed", fn)
        pending = _completing.deferred
    _completing.deferred = None


# -- composing futures ------------------------------------------------------------------------------
# The few shapes every layer needs (split requests, write-then-flush, metadata steps chained on I/O
# completions), written once. Callbacks run on whichever thread completes the future before them.

_SAME = object()


def forward(src: Future, dst: Future, result: Any = _SAME) -> None:
    """Complete ``dst`` with the outcome of the completed ``src`` (its result replaced by
    ``result`` when given and ``src`` succeeded)."""
    exc = src._exc if src._state is _DONE else src.exception()
    if exc is not None:
        dst.set_exception(exc)
    else:
        dst.set_result(src._result if result is _SAME else result)


def resolve(out: Future, fn: Callable[..., Any], *args: Any) -> None:
    """Complete ``out`` with ``fn(*args)``: its value, the outcome of the Future it returns, or the
    exception it raises."""
    try:
        value = fn(*args)
    except BaseException as exc:
        out.set_exception(exc)
        return
    if isinstance(value, Future):
        value.add_done_callback(lambda f: forward(f, out))
    else:
        out.set_result(value)


def then(fut: Future, fn: Callable[..., Any], *args: Any) -> Future:
    """A future for ``fn(*args)`` (a value or a Future), run once ``fut`` succeeds; a failure of
    ``fut`` passes through and ``fn`` never runs."""
    out = Future()

    def step(f):
        if f._exc is not None:
            out.set_exception(f._exc)
        else:
            resolve(out, fn, *args)

    fut.add_done_callback(step)
    return out


def settle(fut: Future, fn: Callable[[Future], Any]) -> Future:
    """A future for ``fn(fut)`` run once ``fut`` completes, succeeded or not (``fn`` may recover
    from the failure, or re-raise it)."""
    out = Future()
    fut.add_done_callback(lambda f: resolve(out, fn, f))
    return out


def followed_by(fut: Future, fn: Callable[[], Future], result: Any = _SAME) -> Future:
    """Once ``fut`` succeeds, start ``fn()`` (a Future, e.g. a flush); complete with ``fut``'s
    result (or ``result``) when that is done too. Write-then-flush for FUA."""
    out = Future()

    def first(f):
        if f._exc is not None:
            out.set_exception(f._exc)
            return
        value = f._result if result is _SAME else result
        try:
            second = fn()
        except BaseException as exc:
            out.set_exception(exc)
            return
        second.add_done_callback(lambda g: forward(g, out, value))

    fut.add_done_callback(first)
    return out


def join(futures: Sequence[Future], result: Any = _SAME) -> Future:
    """One future for several: the first failure wins; otherwise ``result``, or by default the
    sum of the (integer) results. A single future is returned as it is when ``result`` is not
    given."""
    if result is _SAME and len(futures) == 1:
        return futures[0]
    if not futures:
        return completed(0 if result is _SAME else result)
    out = Future()
    lock = threading.Lock()
    state = [len(futures), 0, None]  # remaining, sum of results, first exception

    def done(f):
        exc = f._exc
        with lock:
            state[0] -= 1
            if exc is not None:
                if state[2] is None:
                    state[2] = exc
            else:
                state[1] += f._result or 0
            last = state[0] == 0
        if last:
            if state[2] is not None:
                out.set_exception(state[2])
            else:
                out.set_result(state[1] if result is _SAME else result)

    for f in futures:
        f.add_done_callback(done)
    return out

"""A small, thread-safe future: the completion object every vblock layer returns.

It implements the part of ``concurrent.futures.Future`` that vblock's callers use (``result``,
``exception``, ``done``, ``add_done_callback``, ``set_result``, ``set_exception``,
``cancel``/``cancelled``) at a fraction of its cost: no condition variable is built unless a thread
actually waits, which matters at tens of thousands of requests per second.

Threads: a future may be completed from any thread (usually an engine's completion thread or a
driver's pool thread). Callbacks run in the thread that completes the future, or immediately in the
thread that adds them if the future is already done. A callback must not block; an exception it
raises is logged and swallowed, as in ``concurrent.futures``.
"""

from __future__ import annotations

import logging
import threading

__all__ = ["Future", "completed", "failed", "CancelledError", "defer", "begin_completions",
           "end_completions"]

from concurrent.futures import CancelledError, TimeoutError as _FutureTimeout

_log = logging.getLogger(__name__)
_lock = threading.Lock()  # guards _state/_callbacks/_event of every Future; held for a few bytecodes

_PENDING, _DONE = 0, 1
_completing = threading.local()  # .deferred: {(fn, arg): None} while a batch of completions runs


class Future:
    __slots__ = ("_state", "_result", "_exc", "_callbacks", "_event")

    def __init__(self):
        self._state = _PENDING
        self._result = None
        self._exc = None
        self._callbacks = None
        self._event = None

    # -- producer side ---------------------------------------------------------------------------
    def set_result(self, result):
        self._finish(result, None)

    def set_exception(self, exc):
        self._finish(None, exc)

    def _finish(self, result, exc):
        with _lock:
            if self._state is _DONE:
                raise RuntimeError("future completed twice")
            self._result = result
            self._exc = exc
            self._state = _DONE
            callbacks, self._callbacks = self._callbacks, None
            event = self._event
        if event is not None:
            event.set()
        if callbacks:
            for fn in callbacks:
                try:
                    fn(self)
                except Exception:  # pragma: no cover - mirrors concurrent.futures
                    _log.exception("exception calling callback for %r", self)

    # -- consumer side ---------------------------------------------------------------------------
    def done(self):
        return self._state is _DONE

    def running(self):
        return self._state is _PENDING

    def cancel(self):
        """Requests are never withdrawn once submitted; always ``False``."""
        return False

    def cancelled(self):
        return False

    def add_done_callback(self, fn):
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

    def result(self, timeout=None):
        self._wait(timeout)
        if self._exc is not None:
            raise self._exc
        return self._result

    def exception(self, timeout=None):
        self._wait(timeout)
        return self._exc

    def __repr__(self):
        if self._state is _PENDING:
            return "<Future pending>"
        if self._exc is not None:
            return f"<Future failed {self._exc!r}>"
        return f"<Future done {self._result!r}>"


def completed(result=None):
    """A future that is already done with ``result``."""
    fut = Future()
    fut._state = _DONE
    fut._result = result
    return fut


def failed(exc):
    """A future that is already done with the exception ``exc``."""
    fut = Future()
    fut._state = _DONE
    fut._exc = exc
    return fut


# -- once-per-batch work ----------------------------------------------------------------------------


def defer(fn, arg):
    """Run ``fn(arg)`` once the current batch of completions is over, or now outside one.

    An engine completes futures in batches on its completion thread (``begin_completions`` ...
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


def begin_completions():
    """The calling thread starts completing a batch of futures (see ``defer``)."""
    _completing.deferred = {}


def end_completions():
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

"""Need-check: the header bit that says "repair me at the next open", and when it changes.

A crash in the middle of an allocation can leave clusters allocated but not linked (leaks), and
only a repair gives them back. So before the first allocation of a session the need-check bit is
set and flushed (``ensure``): write ordering is "bit durable, then any allocation". QEMU sets it
only without a backing file and does not flush it; a crash can leak clusters either way, so it is
set in both cases here.

The bit is cleared again when the image is quiet: ``IdleTimer`` runs ``idle_clear`` once
``timeout`` seconds pass after the last allocation ended, and ``close`` clears it too. Clearing
first trims the growth reserve and flushes, so that the file holds nothing unreferenced and every
table is durable before the header says so: "everything durable, then bit cleared". The bit stays
set while an allocation is in flight and after one failed (``QedState.damaged``: it may have left
leaks), until a repair.

Contract: ``ensure`` runs on a pool thread (it blocks on a header write and a flush; concurrent
callers wait for the one that writes); ``idle_clear`` runs on the timer's own thread; ``arm``
is called from any thread, I/O completions included, and never blocks for long. Changes of the
bit are announced under ``QedState.lock`` in ``QedState.need_check_change`` (the inline allocator
reads it to stay off an image whose bit is in flux) and written under ``header_lock``.
"""

from __future__ import annotations

import logging
import threading
import time

from vblock.future import Future
from vblock.hostio.engine import float_thread

from . import format as fmt
from . import header

_log = logging.getLogger("vblock.drivers.qed")


class IdleTimer:
    """One thread that runs ``action`` once ``timeout`` seconds pass after the last ``arm``."""

    def __init__(self, timeout, action):
        self.timeout = timeout
        self.action = action
        self.cond = threading.Condition()
        self.deadline = None
        self.stopped = False
        self.thread = None

    def arm(self):
        with self.cond:
            idle = self.deadline is None
            self.deadline = time.monotonic() + self.timeout
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="qed-need-check", daemon=True)
                self.thread.start()
            if idle:  # a waiting thread with a deadline wakes by itself and sees the new one
                self.cond.notify()

    def stop(self):
        with self.cond:
            self.stopped = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join()

    def _run(self):
        float_thread()  # see QedDriver.pool: armed from a callback, it may start on a pinned worker
        while True:
            with self.cond:
                while not self.stopped and (
                    self.deadline is None or self.deadline > time.monotonic()
                ):
                    wait = None if self.deadline is None else self.deadline - time.monotonic()
                    self.cond.wait(wait)
                if self.stopped:
                    return
                self.deadline = None
            try:
                self.action()
            except Exception:  # logged; the bit stays set and is cleared at close
                _log.exception("clearing the QED need-check bit failed")


class NeedCheck:
    """Sets and clears one image's need-check bit (see the module docstring). ``timeout``:
    seconds without allocation before the bit is cleared; <= 0: only at close."""

    def __init__(self, st, growth, timeout):
        self.st = st
        self.growth = growth
        self.timer = IdleTimer(timeout, self.idle_clear) if timeout > 0 else None

    def ensure(self):
        """Set the bit and make it durable before the first allocation."""
        st = self.st
        while True:
            with st.lock:
                if st.need_check_change is None:
                    if st.header.need_check:
                        return
                    fut = st.need_check_change = Future()
                    mine = True
                else:
                    fut = st.need_check_change
                    mine = False
            if not mine:
                fut.result()
                continue
            try:
                header.write(st, features_set=fmt.F_NEED_CHECK)
                st.f.flush()
            except BaseException as exc:
                with st.lock:
                    st.need_check_change = None
                fut.set_exception(exc)
                raise
            with st.lock:
                st.need_check_change = None
            fut.set_result(None)
            return

    def arm(self):
        """The last allocation in flight ended well: start the idle countdown (if there is one)."""
        if self.timer is not None:
            self.timer.arm()

    def idle_clear(self):
        """Clear the bit when no allocation is in flight (the idle timer's action)."""
        st = self.st
        with st.lock:
            if (
                st.allocs_in_flight
                or st.need_check_change is not None
                or not st.header.need_check
                or st.damaged
            ):
                return
            fut = st.need_check_change = Future()
        err = None
        try:
            self.growth.trim()
            st.f.flush()
            header.write(st, features_clear=fmt.F_NEED_CHECK)
            st.f.flush()
        except BaseException as exc:
            err = exc
        with st.lock:
            st.need_check_change = None
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)
        st.event("NEED_CHECK_CLEARED")

    def set_now(self):
        """Set the bit if it is clear, durably (repair, before it rewrites tables)."""
        if not self.st.header.need_check:
            header.write(self.st, features_set=fmt.F_NEED_CHECK)
            self.st.f.flush()

    def clear_now(self, flush=True):
        """Clear the bit if it is set; the caller knows that no allocation is in flight and that
        nothing is left to repair (the end of a repair, close)."""
        if self.st.header.need_check:
            header.write(self.st, features_clear=fmt.F_NEED_CHECK)
            if flush:
                self.st.f.flush()

    def stop(self):
        """No idle clear from now on (close)."""
        if self.timer is not None:
            self.timer.stop()

"""Host I/O engines: the io_uring engine and the thread engine, behind one Python class.

An ``Engine`` owns one native engine (``vbio_engine``). Submitting is cheap and thread-safe: an op
slot is taken from a preallocated pool, filled in place (no per-request C allocation for up to
``INLINE_IOVS`` buffers) and handed to the engine, or, inside a ``batch()``, kept until the batch
ends and submitted with the others in one call.

Completions: future callbacks run on one of the engine's own threads, one batch at a time (never
two batches of one engine at once), and must not block; a request the engine refuses outright (a
closed engine) fails on the submitting thread instead. What a callback submits to the same engine
is collected and handed over in one call after the batch.

- io_uring: one completion thread reaps finished ops and resubmits in the same ``io_uring_enter``.
  With more than ``poll_depth`` requests in flight (``VBLOCK_POLL_DEPTH``, default 4; 0 = never)
  new requests go through a second ring polled by a kernel thread (SQPOLL, one per process), so
  the kernel's submission work runs beside the completion thread's Python instead of in series
  with it; at lower depths the completion thread enters the kernel itself, the lowest latency.
  With requests in flight and none finished, the completion thread busy-waits on the rings before
  it sleeps, adaptively up to ``spin_us`` (``VBLOCK_SPIN_US``, default 100; 0 = never), as QEMU's
  AioContext polls: the spin doubles (from 4 us) after each sleep shorter than the maximum and
  halves after a longer one, so a device slower than that, or an idle engine, costs no CPU. A
  completion caught spinning skips the sleep and wake-up, and the Python that runs next finds its
  caches warm, which matters most at low depth (see docs/benchmarks.md).
  Files opened through the page cache never poll or spin (``HostFile`` passes 0 for both): there
  the kernel copies the data in the submitting context, and a polling thread only takes a core
  from those copies (a conversion through the page cache runs faster without it).
- threads: ``threads`` worker threads run preadv/pwritev/fdatasync/fallocate and deliver their own
  completions (one worker at a time holds the completer role); the first request a callback
  submits runs next on the same worker, so a closed loop costs no thread hand-off, as with psync.
  From ``PIN_DEPTH`` requests in flight up (until ``FLOAT_DEPTH`` or fewer), each worker keeps to
  one CPU, round-robin over the CPUs the opening thread may use (``worker_cpus``;
  ``VBLOCK_SPREAD_WORKERS=0`` lets them float).

Engine choice: ``"io_uring"``, ``"threads"`` or ``"auto"``; ``auto`` honours the environment
variable ``VBLOCK_ENGINE`` and otherwise probes ``io_uring_setup`` once per process (ENOSYS,
EPERM from ``kernel.io_uring_disabled`` or seccomp → threads). The choice is logged at debug level.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import weakref

from vblock.future import Future, begin_completions, end_completions

from ._binding import ffi, host_error, lib

_log = logging.getLogger("vblock.hostio")

ENGINES = ("auto", "io_uring", "threads")
INLINE_IOVS = 8  # iovecs per preallocated slot; requests with more allocate their own array
_CHUNK = 256  # slots added at a time when the pool runs dry
_REAP_MAX = 256

_OP_NAMES = {
    lib.VBIO_OP_READV: "read",
    lib.VBIO_OP_WRITEV: "write",
    lib.VBIO_OP_FDATASYNC: "flush",
    lib.VBIO_OP_FALLOCATE: "fallocate",
}

_prep1 = lib.vbio_op_prep1
_prepv = lib.vbio_op_prepv
_submit = lib.vbio_engine_submit
_READV, _WRITEV = lib.VBIO_OP_READV, lib.VBIO_OP_WRITEV

_probe_lock = threading.Lock()
_probe_result = None  # None until probed; then 0 or -errno


def uring_available() -> int:
    """0 if io_uring works in this process (probed once), else the negative errno it failed with."""
    global _probe_result
    with _probe_lock:
        if _probe_result is None:
            _probe_result = lib.vbio_uring_probe()
        return _probe_result


def _reset_probe():
    """Forget the probe result (tests that inject io_uring_setup failures use this)."""
    global _probe_result
    with _probe_lock:
        _probe_result = None


PIN_DEPTH = 4  # requests in flight from which a delivering thread-engine worker keeps to its CPU
FLOAT_DEPTH = 2  # ... and at or below which it floats again (the gap: no flip-flop near the line)
POLL_DEPTH = 4  # in-flight requests above which io_uring submits through the SQPOLL ring
SPIN_US = 100  # longest busy-wait of the io_uring completion thread before it sleeps


def _env_int(name, default, unit):
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return max(0, int(value))
    except ValueError:
        raise ValueError(f"{name}={value!r}: expected a number of {unit} (0 = off)") from None


def default_poll_depth():
    """``VBLOCK_POLL_DEPTH`` if set (0 turns the polled ring off), else ``POLL_DEPTH``."""
    return _env_int("VBLOCK_POLL_DEPTH", POLL_DEPTH, "requests")


def default_spin_us():
    """``VBLOCK_SPIN_US`` if set (0 turns busy-waiting off), else ``SPIN_US``."""
    return _env_int("VBLOCK_SPIN_US", SPIN_US, "microseconds")


def float_thread():
    """Let the calling thread run on every CPU the process's main thread may use now (whatever
    pinned it, e.g. starting from a thread-engine worker's callback). Best effort: False if the
    kernel refused. For threads that a completion callback may start (the QED driver's pool)."""
    try:
        os.sched_setaffinity(0, os.sched_getaffinity(os.getpid()))
        return True
    except OSError:
        return False


def worker_cpus():
    """The CPUs the thread engine's workers keep to, one each, round-robin: those the calling thread
    may run on, in order, unless ``VBLOCK_SPREAD_WORKERS=0`` or there is only one (then ``[]``: the
    workers float).

    Why pin: a finished op's worker is woken on the CPU that took the disk interrupt, and on a VM
    whose interrupts all land on one CPU the woken workers queue there behind each other while the
    other CPU idles (a CPU that idles often and briefly does not pull waiting threads over). Each
    worker kept to its own CPU is woken where it runs; the gain is largest when cross-CPU wake-ups
    are slow (``vblock.bench.wake_round_trip`` measures them; docs/benchmarks.md has the figures).
    Only from ``PIN_DEPTH`` requests in flight up (see ``Engine._work_loop``): with one request in
    flight the interrupt's CPU is the best place to wake its worker. A thread started from a completion callback inherits the one CPU of
    the worker it starts on; the QED driver's threads call ``float_thread``."""
    if os.environ.get("VBLOCK_SPREAD_WORKERS", "").strip() == "0":
        return []
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if len(cpus) > 1 else []


def resolve_engine(engine: str) -> str:
    """The concrete engine name for ``engine`` ("auto" | "io_uring" | "threads")."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}: expected one of {', '.join(ENGINES)}")
    if engine == "auto":
        env = os.environ.get("VBLOCK_ENGINE", "").strip()
        if env:
            if env not in ENGINES:
                raise ValueError(f"VBLOCK_ENGINE={env!r}: expected one of {', '.join(ENGINES)}")
            engine = env
    if engine == "auto":
        err = uring_available()
        if err == 0:
            engine = "io_uring"
        else:
            engine = "threads"
            _log.debug("io_uring unavailable (%s): using the thread engine", os.strerror(-err))
        _log.debug("host I/O engine: %s", engine)
    return engine


def _out_arrays():
    """Token and result arrays a completing thread hands to the shim, and int views of them."""
    tokens = ffi.new("int64_t[]", _REAP_MAX)
    results = ffi.new("int64_t[]", _REAP_MAX)
    return (
        tokens,
        results,
        memoryview(ffi.buffer(tokens)).cast("q"),
        memoryview(ffi.buffer(results)).cast("q"),
    )


_open_engines = weakref.WeakSet()
EXIT_TIMEOUT = 30.0  # seconds an engine left open may take to finish its requests at exit


@atexit.register
def _close_open_engines():
    """Close the engines still open when the interpreter exits (their requests in flight finish,
    for up to ``EXIT_TIMEOUT`` seconds each), while their threads still run: once the interpreter
    is finalizing, a thread returning from the shim stops at its next GIL acquire and ``join``
    proves nothing, and an engine freed under a completion thread still inside the shim crashed
    the process (a ``HostFile`` left open by a script, closed by its ``__del__`` during
    finalization)."""
    for engine in list(_open_engines):
        try:
            engine.close(timeout=EXIT_TIMEOUT)
        except Exception:  # pragma: no cover - exiting anyway
            _log.exception("closing %s engine of %s at exit", engine.kind, engine.label)


class Engine:
    """One native engine and the threads that complete its futures. ``label`` names the file in
    error messages; ``threads`` is the thread engine's worker count; ``poll_depth`` (io_uring) is
    the depth above which the SQPOLL ring is used (default: ``default_poll_depth()``); ``spin_us``
    (io_uring) bounds the completion thread's busy-wait (default: ``default_spin_us()``).

    ``submit_*`` methods take byte offsets and buffers (anything ``ffi.from_buffer`` accepts), return
    a ``vblock.future.Future`` whose result is bytes moved (reads: short only at end of file) or
    ``None``, and keep every buffer alive until completion.
    """

    def __init__(self, kind, label, entries=256, threads=16, poll_depth=None, spin_us=None):
        self.kind = kind
        self.label = label
        if poll_depth is None:
            poll_depth = default_poll_depth()
        if spin_us is None:
            spin_us = default_spin_us()
        out = ffi.new("struct vbio_engine **")
        if kind == "io_uring":
            ret = lib.vbio_engine_open(
                lib.VBIO_ENGINE_URING, entries, max(0, poll_depth), max(0, spin_us) * 1000, out
            )
        else:
            ret = lib.vbio_engine_open(lib.VBIO_ENGINE_THREADS, entries, 0, 0, out)
        if ret < 0:
            raise host_error(-ret, f"start {kind} engine for", label)
        self._eng = out[0]
        self._lock = threading.Lock()  # guards _closed against concurrent submitters
        self._closed = False
        self._local = threading.local()  # .batch: list of slot tokens while batching
        self._chunks = []  # keep-alive for the slot arrays
        self._ops = []  # token -> struct vbio_op * (cdata)
        self._opp = []  # token -> struct vbio_op ** pointing at that op (for 1-op submits)
        self._iov = []  # token -> struct iovec * (inline array)
        self._fut = []  # token -> Future or None
        self._keep = []  # token -> buffers' cdata kept alive until completion
        self._free = []
        self._grow()
        if kind == "io_uring":
            self._threads = [
                threading.Thread(target=self._reap_loop, name="vblock-io_uring-reaper", daemon=True)
            ]
        else:
            cpus = worker_cpus()
            self._threads = [
                threading.Thread(
                    target=self._work_loop,
                    name=f"vblock-worker-{i}",
                    daemon=True,
                    args=(cpus[i % len(cpus)],) if cpus else (),
                )
                for i in range(max(1, threads))
            ]
        for t in self._threads:
            t.start()
        _open_engines.add(self)

    # -- slots ------------------------------------------------------------------------------------
    def _grow(self):
        ops = ffi.new("struct vbio_op[]", _CHUNK)
        iovs = ffi.new("struct iovec[]", _CHUNK * INLINE_IOVS)
        ptrs = ffi.new("struct vbio_op *[]", _CHUNK)
        self._chunks.append((ops, iovs, ptrs))
        base = len(self._ops)
        for i in range(_CHUNK):
            ptrs[i] = ops + i
            ops[i].token = base + i
            ops[i].iov = iovs + i * INLINE_IOVS  # a slot's own iovecs unless a request needs more
            self._ops.append(ops + i)
            self._opp.append(ptrs + i)
            self._iov.append(iovs + i * INLINE_IOVS)
            self._fut.append(None)
            self._keep.append(None)
        self._free.extend(range(base + _CHUNK - 1, base - 1, -1))

    def _take(self):
        while True:
            try:
                return self._free.pop()
            except IndexError:
                with self._lock:
                    if not self._free:
                        self._grow()

    # -- submission -------------------------------------------------------------------------------
    def submit1(self, write, fd, offset, cbuf, align, mem_align):
        """One-buffer read or write: filled and alignment-checked by one native call. Returns the
        future, or a ``VBIO_MISALIGNED_*`` code (nothing submitted) for the caller to report.
        (The hot path of every layer: the free list is popped here, ``_take`` only grows it.)"""
        try:
            tok = self._free.pop()
        except IndexError:
            tok = self._take()
        err = _prep1(
            self._ops[tok],
            _WRITEV if write else _READV,
            fd,
            offset,
            cbuf,
            len(cbuf),
            align,
            mem_align,
        )
        if err:
            self._free.append(tok)
            return err
        return self._submit(tok, cbuf)

    def submitv(self, write, fd, offset, cbufs, align, mem_align):
        """``submit1`` for several buffers (``ffi.from_buffer`` cdata): one native call fills the
        iovecs and checks the alignment. Returns the future or a ``VBIO_MISALIGNED_*`` code."""
        try:
            tok = self._free.pop()
        except IndexError:
            tok = self._take()
        n = len(cbufs)
        op = self._ops[tok]
        if n <= INLINE_IOVS:
            keep = cbufs
        else:
            op.iov = iov = ffi.new("struct iovec[]", n)
            keep = (cbufs, iov)
        err = _prepv(
            op,
            _WRITEV if write else _READV,
            fd,
            offset,
            cbufs,
            [len(c) for c in cbufs],
            n,
            align,
            mem_align,
        )
        if err:
            op.iov = self._iov[tok]
            self._free.append(tok)
            return err
        return self._submit(tok, keep)

    def submit_simple(self, opcode, fd, offset=0, length=0, mode=0):
        """fdatasync or fallocate(mode, offset, length)."""
        tok = self._take()
        op = self._ops[tok]
        op.opcode = opcode
        op.fd = fd
        op.offset = offset
        op.length = length
        op.mode = mode
        op.iovcnt = 0
        return self._submit(tok, None)

    def _submit(self, tok, keep):
        fut = Future()
        self._fut[tok] = fut
        self._keep[tok] = keep
        batch = getattr(self._local, "batch", None)
        if batch is not None:
            batch.append(tok)
            return fut
        with self._lock:
            ret = -9 if self._closed else _submit(self._eng, self._opp[tok], 1)
        if ret != 1:
            self._fail_unsubmitted([tok], ret)
        return fut

    def begin_batch(self):
        """Start collecting this thread's submissions; returns False if a batch is already open."""
        if getattr(self._local, "batch", None) is not None:
            return False
        self._local.batch = []
        return True

    def end_batch(self):
        """Submit everything collected since ``begin_batch`` in one native call."""
        toks = self._local.batch
        self._local.batch = None
        if not toks:
            return
        if len(toks) == 1:
            arr = self._opp[toks[0]]
        else:
            arr = ffi.new("struct vbio_op *[]", [self._ops[t] for t in toks])
        with self._lock:
            if self._closed:
                ret = -9
            else:
                ret = lib.vbio_engine_submit(self._eng, arr, len(toks))
        if ret < len(toks):
            self._fail_unsubmitted(toks[max(ret, 0) :], ret if ret < 0 else -5)

    def push(self):
        """Hand what this thread has collected so far (in a ``batch()`` or in completion
        callbacks) to the engine now, and go on collecting. For a request that others wait on
        (a metadata write completing a batch of requests): without it, it would wait for the
        rest of the callbacks of the current completion batch."""
        if getattr(self._local, "batch", None):
            self.end_batch()
            self._local.batch = []

    def _fail_unsubmitted(self, toks, ret):
        """Complete ops the engine did not take (closed engine: EBADF) with an error."""
        for tok in toks:
            op = self._ops[tok]
            fut = self._fut[tok]
            exc = host_error(
                -ret if ret < 0 else 5, _OP_NAMES.get(op.opcode, "I/O"), self.label, op.offset
            )
            keep = self._keep[tok]
            if keep is not None:  # release buffer views now (see HostFile._cbufs)
                if isinstance(keep, tuple):  # the request's own iovec array goes with it
                    op.iov = self._iov[tok]
                for c in keep[0] if isinstance(keep, tuple) else keep:
                    ffi.release(c)
            self._release(tok)
            fut.set_exception(exc)

    def _release(self, tok):
        self._fut[tok] = None
        self._keep[tok] = None
        self._free.append(tok)

    # -- completion -------------------------------------------------------------------------------
    def _deliver(self, n, tok_view, res_view):
        """Complete the futures of ``n`` finished ops (tokens and results in the views) on this
        thread. Callbacks that submit more I/O to this engine (chained requests, closed-loop load)
        are collected, not submitted: the list of their tokens is returned for the caller to hand
        to the engine in one call. Work the callbacks defer() runs once after the batch."""
        futs = self._fut
        keep = self._keep
        free = self._free
        local = self._local
        local.batch = []
        begin_completions()
        # One finished op per call is the common case of the thread engine: no slices or lists.
        done = (
            ((tok_view[0], res_view[0]),)
            if n == 1
            else zip(tok_view[:n].tolist(), res_view[:n].tolist())
        )
        for tok, res in done:
            fut = futs[tok]
            futs[tok] = None
            if keep[tok].__class__ is tuple:  # a request with its own iovec array
                self._ops[tok].iov = self._iov[tok]
            keep[tok] = None
            if res < 0:
                op = self._ops[tok]
                exc = host_error(
                    -res, _OP_NAMES.get(op.opcode, "I/O"), self.label, op.offset, op.length or None
                )
                free.append(tok)
                fut.set_exception(exc)
            else:
                free.append(tok)
                fut.set_result(res)
        end_completions()
        toks = local.batch
        local.batch = None
        return toks

    def _op_array(self, toks):
        if len(toks) == 1:
            return self._opp[toks[0]]
        ops = self._ops
        return ffi.new("struct vbio_op *[]", [ops[t] for t in toks])

    def _reap_loop(self):
        """The io_uring engine's completion thread."""
        tokens, results, tok_view, res_view = _out_arrays()
        eng = self._eng
        reap = lib.vbio_engine_reap_tokens
        submit_reap = lib.vbio_engine_submit_reap
        inflight = lib.vbio_engine_inflight
        toks = None
        while True:
            # Take completions a quarter of the queue at a time: what their callbacks submit goes
            # back to the device before the rest are processed. Draining all of them first (tens
            # of microseconds of Python for a full queue) leaves the device idle meanwhile and
            # locks the queue into convoys.
            chunk = min(_REAP_MAX, ((inflight(eng) + (len(toks) if toks else 0)) >> 2) or 1)
            if not toks:
                n = reap(eng, tokens, results, chunk, -1)
            else:
                n = submit_reap(eng, self._op_array(toks), len(toks), tokens, results, chunk, -1)
            if n < 0:
                _log.error("%s engine: reap failed: %s", self.kind, os.strerror(-n))
                continue
            toks = self._deliver(n, tok_view, res_view)
            # What the callbacks submitted goes to the kernel with the next wait (one syscall).
            if toks and len(toks) > _REAP_MAX // 2:
                self._local.batch = toks
                self.end_batch()
                toks = None
            if not toks and self._closed and inflight(eng) == 0:
                return

    def _work_loop(self, cpu=None):
        """One worker of the thread engine: runs ops and, holding the engine's completer role,
        completes futures; the first op the callbacks submit runs next on this same thread.

        ``cpu`` (see ``worker_cpus``): once ``PIN_DEPTH`` or more requests are in flight when it
        delivers, the worker keeps to that CPU if the main thread may use it (a later ``taskset``
        or ``pin_threads`` wins); at ``FLOAT_DEPTH`` or fewer it floats again (``float_thread``).
        With one request in flight the scheduler best wakes it where the disk interrupt came in:
        pinned workers ran at 0.63-0.65 of fio psync there, floating ones at 0.79-0.87."""
        tokens, results, tok_view, res_view = _out_arrays()
        eng = self._eng
        work = lib.vbio_engine_work
        inflight = lib.vbio_engine_inflight
        opp = self._opp
        toks = None
        holding = 0
        pinned = False
        while True:
            if toks:
                n = work(
                    eng,
                    opp[toks[0]] if len(toks) == 1 else self._op_array(toks),
                    len(toks),
                    holding,
                    tokens,
                    results,
                    _REAP_MAX,
                )
            else:
                n = work(eng, ffi.NULL, 0, holding, tokens, results, _REAP_MAX)
            if n <= 0:
                if n < 0:  # pragma: no cover - only a shim/engine mismatch
                    _log.error("%s engine: worker failed: %s", self.kind, os.strerror(-n))
                return
            holding = 1
            if cpu is not None:
                busy = inflight(eng) + n  # pool_drain has taken the n off already
                if (busy <= FLOAT_DEPTH) if pinned else (busy >= PIN_DEPTH):
                    pinned = not pinned
                    if not pinned:
                        float_thread()
                    elif cpu in os.sched_getaffinity(os.getpid()):
                        try:
                            os.sched_setaffinity(0, {cpu})
                        except OSError as e:  # the CPU went offline: float from now on
                            _log.debug("%s engine worker stays unpinned: %s", self.kind, e)
                            cpu = None
            toks = self._deliver(n, tok_view, res_view)

    def inflight(self):
        return lib.vbio_engine_inflight(self._eng)

    def cross_wakes(self):
        """io_uring: how often a submission woke the completion thread waiting on the other ring
        (diagnostics; each costs a NOP through that ring)."""
        return lib.vbio_engine_cross_wakes(self._eng)

    def close(self, timeout=None):
        """Refuse new submissions, wait for every in-flight op, stop the threads, free the engine.
        With ``timeout`` (seconds), a thread still running after it keeps the engine allocated
        (logged): only the process's exit may free it then."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        lib.vbio_engine_wake(self._eng)
        if threading.current_thread() in self._threads:
            raise RuntimeError("an engine cannot be closed from its own completion callbacks")
        end = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        _open_engines.discard(self)
        if any(t.is_alive() for t in self._threads):
            _log.warning(
                "%s engine of %s: requests still in flight after %s s; left to the process's exit",
                self.kind,
                self.label,
                timeout,
            )
            return
        if sys.is_finalizing():
            return  # see _close_open_engines: the process's exit frees the engine instead
        lib.vbio_engine_close(self._eng)
        self._eng = ffi.NULL

"""Benchmarks: ``python -m vblock.bench <name> [--json]`` (also ``vblock bench``).

Every benchmark measures vblock and a peer (fio, qemu-img bench, or a lower vblock layer) side by
side in the same run and reports ratios, because absolute figures on shared machines drift by tens
of percent between runs. Rows are ``Row`` objects; ``report`` prints them as one markdown table or
as JSON objects with the keys of ``Row``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

NAMES = ("host", "block", "qed", "virtio", "nbd")


@dataclasses.dataclass
class Row:
    layer: str
    engine: str
    pattern: str  # randwrite | randread | ...
    block_size: int  # bytes
    depth: int  # requests in flight
    iops: float
    mbps: float  # 10^6 bytes per second
    peer: str | None = None
    peer_iops: float | None = None
    ratio: float | None = None

    def against(self, peer, peer_iops, ratio=None):
        """Name the peer and its IOPS; ``ratio`` defaults to ``iops / peer_iops`` (pass the median
        of paired per-round ratios when the rows come from several rounds)."""
        self.peer = peer
        self.peer_iops = peer_iops
        if ratio is None:
            ratio = (self.iops / peer_iops) if peer_iops else None
        self.ratio = ratio
        return self


def interleaved(rounds, ours, peer, after=None):
    """``[(ours(), peer())]`` for ``rounds`` rounds, back to back, alternating which side runs first
    so that neither always inherits the state (page cache, disk, CPU) the other left; ``after()``,
    if given, runs after each round (a check of the results, say)."""
    out = []
    for n in range(rounds):
        if n % 2:
            b = peer()
            out.append((ours(), b))
        else:
            a = ours()
            out.append((a, peer()))
        if after is not None:
            after()
    return out


def medians(pairs):
    """``(median of ours, median of the peer's, median of the per-round ratios ours / peer)`` of
    ``[(ours, peer)]``: a burst of load from other processes skews one round, not the result.
    Rounds where the peer measured nothing (0 or None) give no ratio; the ratio is None if none
    is left."""
    ours = statistics.median(p[0] for p in pairs)
    theirs = [p[1] for p in pairs if p[1]]
    ratios = [a / b for a, b in pairs if b]
    return (
        ours,
        statistics.median(theirs) if theirs else None,
        statistics.median(ratios) if ratios else None,
    )


def report(rows, as_json=False, out=None):
    out = sys.stdout if out is None else out  # looked up now: callers may have redirected it
    if as_json:
        for r in rows:
            out.write(json.dumps(dataclasses.asdict(r)) + "\n")
        return
    out.write(
        "| layer | engine | pattern | bs | depth | IOPS | MB/s | peer | peer IOPS | ratio |\n"
    )
    out.write("|---|---|---|---:|---:|---:|---:|---|---:|---:|\n")
    for r in rows:
        peer_iops = f"{r.peer_iops:.0f}" if r.peer_iops else "-"
        ratio = f"{r.ratio:.2f}" if r.ratio else "-"
        out.write(
            f"| {r.layer} | {r.engine} | {r.pattern} | {r.block_size // 1024}k | {r.depth} | "
            f"{r.iops:.0f} | {r.mbps:.1f} | {r.peer or '-'} | {peer_iops} | {ratio} |\n"
        )


def bench_dir():
    """A scratch directory on a disk-backed file system (O_DIRECT works there; /tmp may be tmpfs).
    ``VBLOCK_BENCH_DIR`` overrides."""
    base = os.environ.get("VBLOCK_BENCH_DIR") or ("/var/tmp" if os.path.isdir("/var/tmp") else None)
    return tempfile.mkdtemp(prefix="vblock-bench-", dir=base)


def preallocated_file(directory, size, name="bench.img"):
    """A file of ``size`` bytes, every block written once (non-zero data, then fdatasync), so
    writes measure overwrites, not allocation, and reads really reach the disk (blocks that are
    merely fallocated read as zeros without any device I/O)."""
    path = os.path.join(directory, name)
    chunk = bytes([0xA5]) * (8 << 20)
    with open(path, "wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
        left = size
        while left > 0:
            left -= f.write(chunk[: min(left, len(chunk))])
    settle_file(path)
    return path


def settle_file(path):
    """Write ``path``'s dirty pages to the disk and drop its pages from the page cache, so the
    file starts a timed run as if it had been on the disk all along: an O_DIRECT write over a
    dirty cached page must first write it back and invalidate it, which would burden whichever
    side of a pair happens to meet those pages."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_OFFSETS = 1 << 17  # random offsets drawn per run (as many as 8 KiB blocks in 1 GiB)
OFFSETS_MASK = _OFFSETS - 1


def drawn_offsets(nblocks, block_size, seed=1):
    """A repeating table of random offsets (``randrange(nblocks) * block_size``, seeded), drawn
    before a benchmark's clock starts; index it with ``i & OFFSETS_MASK``. All zeros when there is
    at most one block (callers that choose their own offsets)."""
    if nblocks <= 1:
        return [0] * _OFFSETS
    rng = random.Random(seed)
    return [rng.randrange(nblocks) * block_size for _ in range(_OFFSETS)]


def closed_loop(submit, depth, duration, nblocks, block_size, seed=1):
    """Keep ``depth`` requests in flight for ``duration`` seconds.

    ``submit(offset, slot)`` starts one request and returns its future; every completion starts
    the next request from the completing thread (no hand-off), as fio does in its own loop. The
    offsets are drawn before the clock starts and the per-completion work is a counter and a
    clock read, so the harness costs next to nothing beside what it measures.
    Returns (completed requests, elapsed seconds). Raises the first request failure.
    """
    offsets = drawn_offsets(nblocks, block_size, seed)
    counter = itertools.count()  # next() is atomic under the GIL
    errors = []
    active = [depth]
    lock = threading.Lock()
    finished = threading.Event()
    now = time.perf_counter

    def completion(slot):
        def done(fu):
            i = next(counter)
            exc = fu.exception()
            if exc is None and now() < deadline:
                submit(offsets[i & OFFSETS_MASK], slot).add_done_callback(done)
                return
            if exc is not None:
                errors.append(exc)
            with lock:
                active[0] -= 1
                if active[0] == 0:
                    finished.set()

        return done

    callbacks = [completion(slot) for slot in range(depth)]
    start = now()
    deadline = start + duration
    for slot in range(depth):
        submit(offsets[(_OFFSETS - 1 - slot) & OFFSETS_MASK], slot).add_done_callback(
            callbacks[slot]
        )
    finished.wait(duration * 10 + 30)
    elapsed = now() - start
    if errors:
        raise errors[0]
    return next(counter), elapsed


def pin_threads(cpus):
    """Confine this process's threads to the CPUs in ``cpus``, except the kernel's io_uring
    threads (``iou-*``: the SQPOLL poller keeps whatever CPU the scheduler gives it). Threads
    started later inherit the mask of the thread that starts them. Returns how many were pinned.

    For placement studies: on a guest whose disk interrupts all land on one CPU, a Python thread
    on that CPU loses a share of it to completion interrupts, and where the scheduler happens to
    put the busiest thread moves a CPU-bound benchmark by a third (README, virtio rows)."""
    pinned = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().startswith("iou-"):
                    continue
            os.sched_setaffinity(int(tid), cpus)
            pinned += 1
        except (FileNotFoundError, ProcessLookupError):
            continue  # the thread ended meanwhile
    return pinned


def wake_round_trip(trips=1000):
    """Mean microseconds for a thread to wake a thread on another CPU and be woken back by it (a
    one-byte pipe ping-pong between two threads pinned to two CPUs), or None with one CPU (or if a
    thread cannot be pinned).

    A gauge of the machine, printed beside benchmarks whose engines hand work between threads: on
    a VM it moves with the host's load (on the 2-vCPU machine of the README, 31-45 us in some
    minutes and 46-60 us in others), and in the slow minutes every cross-CPU wake-up and VM exit
    costs more. fio's psync threads need little CPU a request and barely notice; vblock's thread
    engine runs Python for each request and loses a share of its ratio then."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    a_r, a_w = os.pipe()
    b_r, b_w = os.pipe()

    def peer():
        try:
            os.sched_setaffinity(0, {cpus[1]})
            while os.read(a_r, 1):  # until the measuring side closes its end
                os.write(b_w, b"x")
        except OSError:
            pass  # a CPU it cannot run on: the measuring side sees the pipe close
        finally:
            os.close(b_w)  # a failed peer ends the measuring side's reads too

    mask = os.sched_getaffinity(0)
    t = threading.Thread(target=peer, name="vblock-wake-gauge", daemon=True)
    elapsed = None
    try:
        os.sched_setaffinity(0, {cpus[0]})
        t.start()
        start = time.perf_counter()
        for _ in range(trips):
            os.write(a_w, b"x")
            if not os.read(b_r, 1):
                break  # the peer failed: no reading
        else:
            elapsed = time.perf_counter() - start
    except OSError:
        elapsed = None  # this thread cannot be pinned: no reading
    finally:
        os.sched_setaffinity(0, mask)
        os.close(a_w)
        if t.ident is not None:
            t.join()
        else:
            os.close(b_w)
        os.close(a_r)
        os.close(b_r)
    return None if elapsed is None else elapsed / trips * 1e6


def fio_available():
    return shutil.which("fio") is not None


def run_fio(path, size, rw, bs, depth, engine, runtime):
    """One fio job on ``path``; returns IOPS. ``engine`` is "io_uring" or "psync" (then ``depth``
    threads of psync, the peer of vblock's thread engine)."""
    cmd = [
        "fio",
        "--name=peer",
        f"--filename={path}",
        f"--size={size}",
        "--direct=1",
        f"--rw={rw}",
        f"--bs={bs}",
        "--time_based",
        f"--runtime={runtime}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
        "--group_reporting",
        "--thread",
    ]
    if engine == "io_uring":
        cmd += ["--ioengine=io_uring", f"--iodepth={depth}"]
    else:
        cmd += ["--ioengine=psync", f"--numjobs={depth}"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    job = json.loads(out[out.index("{") :])["jobs"][0]
    side = job["write"] if "write" in rw else job["read"]
    return float(side["iops"])

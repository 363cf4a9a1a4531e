"""``python -m vblock.bench block``: the raw driver through ``vblock.block`` against the bare HostFile.

A 1 GiB preallocated file in a scratch directory; 8 KiB random writes and 4 KiB random reads at 1,
8 and 16 requests in flight, O_DIRECT (cache "none"), aligned buffers. Each case measures the bare
``HostFile`` engine (the peer, as in ``python -m vblock.bench host``) and ``Image.submit_*`` on the
same file with the same engine, in alternating slices, so ``ratio`` is the cost of the block layer
(edge checks, range-lock entry, driver dispatch) in one run.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time

import vblock
from vblock.bench import Row, bench_dir, closed_loop, preallocated_file, report
from vblock.hostio import HostFile

SIZE = 1 << 30
CASES = (("randwrite", 8192), ("randread", 4096))
DEPTHS = (1, 8, 16)


def _submitter(target, alloc, pattern, bs, depth):
    bufs = [alloc(bs) for _ in range(depth)]
    for b in bufs:
        b[:] = b"\x5a" * bs
    lists = [[b] for b in bufs]
    call = target.submit_write if pattern == "randwrite" else target.submit_read

    def submit(offset, slot):
        return call(offset, lists[slot])

    return submit


def run(
    duration=2.0,
    depths=DEPTHS,
    engines=("io_uring", "threads"),
    cases=CASES,
    size=SIZE,
    rounds=4,
    verbose=False,
):
    """Rows of block-vs-host IOPS. Each side gets ``duration`` seconds per case, cut into
    ``rounds`` slices that alternate host, block, host, block... so that drift in the machine's
    speed (other work on a shared host) hits both sides alike. ``verbose`` prints the process CPU
    time per request of each side to stderr (steadier than IOPS on a busy machine)."""
    rows = []
    tmp = bench_dir()
    try:
        path = preallocated_file(tmp, size)
        for engine in engines:
            with (
                HostFile(path, direct=True, engine=engine) as f,
                vblock.open_image(path, format="raw", cache="none", aio=engine) as img,
            ):
                for pattern, bs in cases:
                    for depth in depths:
                        sides = {
                            "host": _submitter(f, f.alloc, pattern, bs, depth),
                            "block": _submitter(img, img.driver.hostfile.alloc, pattern, bs, depth),
                        }
                        done = {"host": [0, 0.0, 0.0], "block": [0, 0.0, 0.0]}  # requests, s, CPU s
                        for r in range(rounds):
                            for side in ("host", "block") if r % 2 == 0 else ("block", "host"):
                                cpu = time.process_time()
                                count, elapsed = closed_loop(
                                    sides[side], depth, duration / rounds, size // bs, bs, seed=r
                                )
                                done[side][0] += count
                                done[side][1] += elapsed
                                done[side][2] += time.process_time() - cpu
                        peer_iops = done["host"][0] / done["host"][1]
                        iops = done["block"][0] / done["block"][1]
                        row = Row("block", engine, pattern, bs, depth, iops, iops * bs / 1e6)
                        rows.append(row.against(f"hostfile {engine}", peer_iops))
                        if verbose:
                            cpu_us = {k: v[2] / max(v[0], 1) * 1e6 for k, v in done.items()}
                            print(
                                f"# {engine} {pattern} {bs // 1024}k d{depth}: CPU per request "
                                f"host {cpu_us['host']:.1f} us, block {cpu_us['block']:.1f} us",
                                file=sys.stderr,
                            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m vblock.bench block", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument(
        "--duration", type=float, default=2.0, help="seconds per case and side (default 2)"
    )
    ap.add_argument(
        "--depth",
        type=int,
        action="append",
        help="requests in flight (repeatable; default 1, 8, 16)",
    )
    ap.add_argument(
        "--engine",
        choices=("io_uring", "threads"),
        action="append",
        help="host engine (repeatable)",
    )
    ap.add_argument(
        "--rounds", type=int, default=4, help="alternating host/block slices per case (default 4)"
    )
    ap.add_argument("-v", "--verbose", action="store_true", help="CPU time per request on stderr")
    ap.add_argument(
        "--pattern", choices=[c[0] for c in CASES], action="append", help="pattern (repeatable)"
    )
    args = ap.parse_args(argv)
    cases = tuple(c for c in CASES if not args.pattern or c[0] in args.pattern)
    rows = run(
        duration=args.duration,
        depths=tuple(args.depth or DEPTHS),
        engines=tuple(args.engine or ("io_uring", "threads")),
        cases=cases,
        rounds=max(1, args.rounds),
        verbose=args.verbose,
    )
    report(rows, as_json=args.json)
    return 0

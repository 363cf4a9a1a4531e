"""``python -m vblock.bench host``: the bare HostFile engines against fio, O_DIRECT.

A 1 GiB preallocated file in a scratch directory; 8 KiB random writes and 4 KiB random reads at 1,
8 and 16 requests in flight, through the io_uring engine (peer: fio io_uring at the same depth) and
the thread engine (peer: fio psync with as many threads). Each case alternates fio and vblock runs
on the same file, pair by pair, and reports the median ratio of the pairs.
"""

from __future__ import annotations

import argparse
import shutil
import sys

from vblock.bench import (
    Row,
    bench_dir,
    closed_loop,
    fio_available,
    interleaved,
    medians,
    preallocated_file,
    report,
    run_fio,
    wake_round_trip,
)
from vblock.hostio import HostFile

SIZE = 1 << 30
CASES = (("randwrite", 8192), ("randread", 4096))
DEPTHS = (1, 8, 16)


def measure(f, pattern, bs, depth, duration):
    """IOPS of ``depth`` requests in flight on HostFile ``f``."""
    bufs = [f.alloc(bs) for _ in range(depth)]
    for b in bufs:
        b[:] = b"\xa5" * bs
    if pattern == "randwrite":

        def submit(offset, slot):
            return f.submit_write(offset, [bufs[slot]])
    else:

        def submit(offset, slot):
            return f.submit_read(offset, [bufs[slot]])

    count, elapsed = closed_loop(submit, depth, duration, SIZE // bs, bs)
    return count / elapsed


def run(
    duration=1.0,
    depths=DEPTHS,
    engines=("io_uring", "threads"),
    peers=True,
    size=SIZE,
    rounds=3,
    gauge=None,
):
    """Rows of HostFile-vs-fio IOPS. Each case runs ``rounds`` pairs (fio, then vblock, ``duration``
    seconds each, on the same file); a row reports the medians of both sides and the median of the
    per-pair ratios, which keeps the machine's drift (tens of percent within seconds on shared
    hosts) out of the comparison. ``gauge``, a list, receives ``wake_round_trip()`` readings taken
    before each engine's cases and at the end."""
    rows = []
    tmp = bench_dir()
    try:
        path = preallocated_file(tmp, size)
        use_fio = peers and fio_available()
        for engine in engines:
            if gauge is not None:
                gauge.append(wake_round_trip())
            fio_engine = "io_uring" if engine == "io_uring" else "psync"
            with HostFile(path, direct=True, engine=engine) as f:
                for pattern, bs in CASES:
                    for depth in depths:
                        pairs = interleaved(
                            max(1, rounds),
                            lambda: measure(f, pattern, bs, depth, duration),
                            lambda: (
                                run_fio(
                                    path,
                                    size,
                                    pattern,
                                    bs,
                                    depth,
                                    fio_engine,
                                    max(1, round(duration)),
                                )
                                if use_fio
                                else None
                            ),
                        )
                        iops, theirs, ratio = medians(pairs)
                        row = Row("host", engine, pattern, bs, depth, iops, iops * bs / 1e6)
                        if ratio is not None:
                            row.against(f"fio {fio_engine}", theirs, ratio)
                        rows.append(row)
        if gauge is not None:
            gauge.append(wake_round_trip())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m vblock.bench host", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--duration", type=float, default=1.0, help="seconds per run (default 1)")
    ap.add_argument("--rounds", type=int, default=3, help="fio/vblock pairs per case (default 3)")
    ap.add_argument("--no-peer", action="store_true", help="skip fio")
    args = ap.parse_args(argv)
    gauge = []
    rows = run(duration=args.duration, peers=not args.no_peer, rounds=args.rounds, gauge=gauge)
    report(rows, as_json=args.json)
    readings = [g for g in gauge if g is not None]
    if readings:  # beside the table, or on stderr so the JSON lines stay the rows alone
        print(
            f"\ncross-CPU wake-up round trip (wake_round_trip): {', '.join(f'{g:.0f}' for g in readings)} us "
            "(before each engine's cases and at the end; slow readings mark minutes in which "
            "the thread engine's ratio falls: docs/benchmarks.md)",
            file=sys.stderr if args.json else sys.stdout,
        )
    return 0

"""``python -m vblock.bench host``: the bare HostFile engines against fio, O_DIRECT.

A 1 GiB preallocated file in a scratch directory; 8 KiB random writes and 4 KiB random reads at 1,
8 and 16 requests in flight, through the io_uring engine (peer: fio io_uring at the same depth) and
the thread engine (peer: fio psync with as many threads). Each vblock case runs right after its fio
twin on the same file, so both see the same machine state.
"""

from __future__ import annotations

import argparse
import shutil

from vblock.bench import Row, bench_dir, closed_loop, fio_available, preallocated_file, report, run_fio
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


def run(duration=2.0, depths=DEPTHS, engines=("io_uring", "threads"), peers=True, size=SIZE):
    rows = []
    tmp = bench_dir()
    try:
        path = preallocated_file(tmp, size)
        use_fio = peers and fio_available()
        for engine in engines:
            with HostFile(path, direct=True, engine=engine) as f:
                for pattern, bs in CASES:
                    for depth in depths:
                        peer_iops = None
                        if use_fio:
                            fio_engine = "io_uring" if engine == "io_uring" else "psync"
                            peer_iops = run_fio(path, size, pattern, bs, depth, fio_engine, max(1, int(duration)))
                        iops = measure(f, pattern, bs, depth, duration)
                        row = Row("host", engine, pattern, bs, depth, iops, iops * bs / 1e6)
                        if peer_iops:
                            row.against(f"fio {'io_uring' if engine == 'io_uring' else 'psync'}", peer_iops)
                        rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vblock.bench host", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per case (default 2)")
    ap.add_argument("--no-peer", action="store_true", help="skip fio")
    args = ap.parse_args(argv)
    rows = run(duration=args.duration, peers=not args.no_peer)
    report(rows, as_json=args.json)
    return 0

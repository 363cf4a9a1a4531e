"""``vblock bench convert``: ``vblock convert`` against ``qemu-img convert -O qed``, same run, same file.

The source is a 4 GiB sparse raw file holding 1 GiB of random data (256 extents of 4 MiB, one every
16 MiB). Both tools run as commands (process start-up included), alternately, ``--rounds`` times
each, after a ``sync`` so neither pays for the other's dirty pages; the source stays in the page
cache for both. The row shows each tool's best run (single runs on a shared VM disk vary a lot);
the printed lines add the medians. Pairings: each tool's default (qemu-img's output cache mode is ``unsafe``:
no flush; vblock's is ``writeback``: flushed before the rename), both at ``unsafe`` and both at
``writeback``, and vblock's conversion called in-process (no interpreter start-up) against the
qemu-img command. Every vblock
result must pass ``qemu-img check`` and ``qemu-img compare`` against the source. The row's IOPS are
2 MiB chunks per second; ratio = vblock speed / qemu-img speed (> 1: vblock is faster).
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

from vblock.bench import Row, bench_dir, report

SIZE = 4 << 30
DATA = 1 << 30
EXTENT = 4 << 20
CHUNK = 2 << 20


def make_source(path, size=SIZE, data=DATA, extent=EXTENT, seed=1):
    """A sparse raw file of ``size`` bytes with ``data`` bytes of random data in evenly spaced
    extents."""
    rng = random.Random(seed)
    pool = rng.randbytes(4 * extent)
    count = data // extent
    stride = size // count
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i in range(count):
            k = (i * 7 * 4096) % (3 * extent)
            os.pwrite(fd, pool[k : k + extent], i * stride)
        os.fsync(fd)
    finally:
        os.close(fd)


def _vblock_cmd():
    exe = shutil.which("vblock")
    return [exe] if exe else [sys.executable, "-m", "vblock"]


def _timed(cmd):
    if os.path.exists(cmd[-1]):
        os.unlink(cmd[-1])
    os.sync()
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def _in_process(src, dst):
    """``vblock.cli.convert.convert`` called in this process: the conversion without the
    interpreter's start-up and imports (about 0.3 s here), to show where the difference lies."""
    from vblock.cli.convert import convert

    if os.path.exists(dst):
        os.unlink(dst)
    os.sync()
    t0 = time.perf_counter()
    convert(src, dst, "qed", fmt="raw", cache="unsafe")
    return time.perf_counter() - t0


def _verify(src, dst):
    subprocess.run(["qemu-img", "check", "-q", dst], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", src, dst], check=True)


def run(rounds=5, size=SIZE, data=DATA, verify=True):
    if shutil.which("qemu-img") is None:
        raise RuntimeError("qemu-img is not installed (apt-get install qemu-utils)")
    tmp = bench_dir()
    rows = []
    try:
        src = os.path.join(tmp, "src.raw")
        make_source(src, size, data)
        with open(src, "rb") as f:  # warm the page cache for both tools
            while f.read(16 << 20):
                pass
        dq, dv = os.path.join(tmp, "q.qed"), os.path.join(tmp, "v.qed")
        vb = _vblock_cmd()
        pairs = (
            ("defaults", ["qemu-img", "convert", "-O", "qed", src, dq],
             vb + ["convert", "-q", "-f", "raw", "-O", "qed", src, dv]),
            ("both unsafe", ["qemu-img", "convert", "-t", "unsafe", "-O", "qed", src, dq],
             vb + ["convert", "-q", "-f", "raw", "-t", "unsafe", "-O", "qed", src, dv]),
            ("both writeback", ["qemu-img", "convert", "-t", "writeback", "-O", "qed", src, dq],
             vb + ["convert", "-q", "-f", "raw", "-t", "writeback", "-O", "qed", src, dv]),
        )
        pairs += (("in-process, both unsafe", ["qemu-img", "convert", "-O", "qed", src, dq],
                   lambda: _in_process(src, dv)),)
        for label, qcmd, vcmd in pairs:
            tq, tv = [], []
            for _ in range(rounds):
                tq.append(_timed(qcmd))
                tv.append(_timed(vcmd) if not callable(vcmd) else vcmd())
                if verify:
                    _verify(src, dv)
            # best of N: on a shared VM disk single runs vary up to 5x with host writeback and
            # discards; the fastest run is what each tool can do (medians are printed too)
            q, v = min(tq), min(tv)
            chunks = data / CHUNK
            row = Row("convert", label, f"raw {size >> 30}G/{data >> 30}G data -> qed", CHUNK, 16,
                      chunks / v, data / v / 1e6)
            row.against("qemu-img convert", chunks / q)
            row.seconds, row.peer_seconds = v, q
            row.median_seconds, row.peer_median_seconds = statistics.median(tv), statistics.median(tq)
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vblock bench convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--rounds", type=int, default=5, help="runs of each tool per pairing (median; default 5)")
    ap.add_argument("--no-verify", action="store_true", help="skip qemu-img check/compare of the results")
    args = ap.parse_args(argv)
    rows = run(rounds=args.rounds, verify=not args.no_verify)
    report(rows, as_json=args.json)
    if not args.json:
        for r in rows:
            print(f"convert ({r.engine}): best vblock {r.seconds:.2f} s, qemu-img {r.peer_seconds:.2f} s, "
                  f"time ratio {r.seconds / r.peer_seconds:.2f}x; median vblock {r.median_seconds:.2f} s, "
                  f"qemu-img {r.peer_median_seconds:.2f} s, time ratio "
                  f"{r.median_seconds / r.peer_median_seconds:.2f}x")
    return 0

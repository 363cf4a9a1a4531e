"""``vblock bench convert``: ``vblock convert`` against ``qemu-img convert -O qed``, same run, same file.

Three sources (``--rows``): ``raw`` (below), ``qcow2`` (the same 4 GiB / 1 GiB layout, made a qcow2
by qemu-img: ``vblock convert -f qcow2 -O qed`` against ``qemu-img convert -f qcow2 -O qed``, both
``-t unsafe``) and ``inplace`` (an 8 GiB qcow2 holding 2 GiB of data: ``vblock convert --in-place
-O qed``, durable by design, against the durable copy ``qemu-img convert -t writeback -f qcow2 -O
qed``; each round converts a fresh copy of the qcow2, made untimed; the row's ``MB/s`` column is
then the bytes the in-place conversion wrote, in MB, since it writes metadata only).

The source is a 4 GiB sparse raw file holding 1 GiB of random data (256 extents of 4 MiB, one every
16 MiB). Both tools run as commands (process start-up included) in back-to-back pairs, the order
alternating from round to round, each run after a ``sync`` (so neither pays for the other's dirty
pages) and the deletion of its own previous output (see ``_fresh``); the source stays in the page
cache for both. Pairings: both tools' default command lines (``-t unsafe``: no flush, the default
of ``qemu-img convert`` and of ``vblock convert``), both ``-t writeback`` (flushed at the end),
and vblock's conversion engine called in-process (no interpreter start-up). The package's modules are
byte-compiled first, as an installed package's are (an environment with
``PYTHONDONTWRITEBYTECODE`` would otherwise compile them on every run).
Every vblock result must pass ``qemu-img check`` and ``qemu-img compare`` against the source.
The row's IOPS are 2 MiB chunks per second at the median time; ratio = the median over pairs of
qemu-img time / vblock time (> 1: vblock is faster), since single runs on a shared VM disk vary
several-fold and a pair sees the same conditions.
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

from vblock.bench import Row, bench_dir, interleaved, report

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


def _fresh(path):
    """Before a timed run: write back whatever the previous run left dirty, then delete this
    run's old output, in that order. Deleting first and then syncing (a second or more of the
    other tool's writeback) left the freed pages idle long enough for this VM to hand them back
    to its host (free page reporting), and the run then paid host page faults on every page it
    wrote: several times slower, and more often for the process that starts slower."""
    os.sync()
    if os.path.exists(path):
        os.unlink(path)


def _timed(cmd):
    _fresh(cmd[-1])
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - t0


def _compile_package():
    """Byte-compile vblock's modules where they live (an installed package's already are)."""
    import compileall
    import importlib

    for name in ("vblock", "vblock.drivers"):
        for d in importlib.import_module(name).__path__:
            compileall.compile_dir(d, quiet=1)


def _in_process(src, dst):
    """The conversion engine (``vblock.block.convert``) called in this process, from opening the
    source to closing the new image, as ``vblock convert -f raw -O qed`` does it (``-t unsafe``,
    source through the page cache) but written in place rather than renamed there: the conversion
    without the interpreter's start-up and imports, to show where the difference lies."""
    import vblock
    from vblock.block.convert import convert

    _fresh(dst)
    t0 = time.perf_counter()
    with vblock.open_image(src, format="raw", read_only=True, cache="writeback") as s:
        vblock.create_image(
            dst, "qed", -(-s.size // 512) * 512
        ).close()  # whole sectors, as the CLI
        with vblock.open_image(dst, format="qed", cache="unsafe") as d:
            convert(s, d)
    return time.perf_counter() - t0


def _verify(src, dst):
    subprocess.run(["qemu-img", "check", "-q", dst], check=True)
    subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "qed", src, dst], check=True)


def _pair_rows(label, pattern, qcmd, run_v, rounds, data, verify):
    pairs = interleaved(rounds, run_v, lambda: _timed(qcmd), after=verify or None)
    tv, tq = [p[0] for p in pairs], [p[1] for p in pairs]
    ratios = [q / v for v, q in pairs]  # times: above 1, vblock took less
    q, v = statistics.median(tq), statistics.median(tv)
    chunks = data / CHUNK
    row = Row("convert", label, pattern, CHUNK, 16, chunks / v, data / v / 1e6)
    row.against("qemu-img convert", chunks / q, ratio=statistics.median(ratios))
    row.seconds, row.peer_seconds = v, q
    row.best_seconds, row.peer_best_seconds = min(tv), min(tq)
    return row


def _qcow2_source(tmp, raw, name):
    path = os.path.join(tmp, name)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path], check=True)
    return path


def run_qcow2(tmp, rounds, verify, size=SIZE, data=DATA):
    """qcow2 -> QED copies, vblock against qemu-img."""
    raw = os.path.join(tmp, "src.raw")
    make_source(raw, size, data)
    src = _qcow2_source(tmp, raw, "src.qcow2")
    os.unlink(raw)
    with open(src, "rb") as f:
        while f.read(16 << 20):
            pass
    dq, dv = os.path.join(tmp, "q.qed"), os.path.join(tmp, "v.qed")
    vcmd = _vblock_cmd() + ["convert", "-q", "-f", "qcow2", "-O", "qed", src, dv]
    qcmd = ["qemu-img", "convert", "-f", "qcow2", "-O", "qed", src, dq]

    def check():
        subprocess.run(["qemu-img", "check", "-q", dv], check=True)
        subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qed", src, dv], check=True
        )

    row = _pair_rows(
        "qcow2 default (unsafe)",
        f"qcow2 {size >> 30}G/{data >> 30}G data -> qed",
        qcmd,
        lambda: _timed(vcmd),
        rounds,
        data,
        check if verify else None,
    )
    for p in (src, dq, dv):
        if os.path.exists(p):
            os.unlink(p)
    return row


def run_inplace(tmp, rounds, verify, size=2 * SIZE, data=2 * DATA):
    """In place (durable by design) against a durable qemu-img copy; reports bytes written."""
    raw = os.path.join(tmp, "src.raw")
    make_source(raw, size, data)
    orig = _qcow2_source(tmp, raw, "orig.qcow2")
    os.unlink(raw)
    work, dq = os.path.join(tmp, "work.qcow2"), os.path.join(tmp, "q.qed")
    written = []

    def run_v():
        if os.path.exists(work):
            os.unlink(work)
        subprocess.run(["cp", "--sparse=always", orig, work], check=True)
        os.sync()
        t0 = time.perf_counter()
        p = subprocess.run(
            _vblock_cmd() + ["convert", "--in-place", "-O", "qed", work],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        elapsed = time.perf_counter() - t0
        written.append(p.stderr)
        return elapsed

    qcmd = ["qemu-img", "convert", "-t", "writeback", "-f", "qcow2", "-O", "qed", orig, dq]

    def check():
        subprocess.run(
            ["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "qed", orig, work], check=True
        )

    row = _pair_rows(
        "in place vs writeback copy",
        f"qcow2 {size >> 30}G/{data >> 30}G data -> qed",
        qcmd,
        run_v,
        rounds,
        data,
        check if verify else None,
    )
    row.written = written[-1].strip() if written else ""
    for p in (orig, work, dq):
        if os.path.exists(p):
            os.unlink(p)
    return row


def run(rounds=5, size=SIZE, data=DATA, verify=True, which=("raw",)):
    """Rows for the sources in ``which``; the in-place source is twice ``size`` and ``data``."""
    rows = []
    if shutil.which("qemu-img") is None:
        raise RuntimeError("qemu-img is not installed (apt-get install qemu-utils)")
    if "raw" in which:
        rows += run_raw(rounds, size, data, verify)
    for name, fn, scale in (("qcow2", run_qcow2, 1), ("inplace", run_inplace, 2)):
        if name in which:
            tmp = bench_dir()
            try:
                _compile_package()
                rows.append(fn(tmp, rounds, verify, size=scale * size, data=scale * data))
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return rows


def run_raw(rounds=5, size=SIZE, data=DATA, verify=True):
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
        _compile_package()
        vb = _vblock_cmd()
        qemu = ["qemu-img", "convert", "-O", "qed", src, dq]
        pairs = (
            ("default (unsafe)", qemu, vb + ["convert", "-q", "-f", "raw", "-O", "qed", src, dv]),
            (
                "both writeback",
                ["qemu-img", "convert", "-t", "writeback", "-O", "qed", src, dq],
                vb + ["convert", "-q", "-f", "raw", "-t", "writeback", "-O", "qed", src, dv],
            ),
            ("in-process, unsafe", qemu, lambda: _in_process(src, dv)),
        )
        for label, qcmd, vcmd in pairs:
            run_v = vcmd if callable(vcmd) else (lambda vcmd=vcmd: _timed(vcmd))
            check = (lambda: _verify(src, dv)) if verify else None
            rows.append(
                _pair_rows(
                    label,
                    f"raw {size >> 30}G/{data >> 30}G data -> qed",
                    qcmd,
                    run_v,
                    rounds,
                    data,
                    check,
                )
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="vblock bench convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--rounds", type=int, default=5, help="pairs of runs per pairing (default 5)")
    ap.add_argument(
        "--no-verify", action="store_true", help="skip qemu-img check/compare of the results"
    )
    ap.add_argument(
        "--rows",
        default="raw,qcow2,inplace",
        help="sources to convert, comma-separated: raw, qcow2, inplace (default all)",
    )
    args = ap.parse_args(argv)
    which = tuple(w.strip() for w in args.rows.split(",") if w.strip())
    rows = run(rounds=args.rounds, verify=not args.no_verify, which=which)
    report(rows, as_json=args.json)
    if not args.json:
        for r in rows:
            print(
                f"convert ({r.engine}): median vblock {r.seconds:.2f} s, qemu-img {r.peer_seconds:.2f} s; "
                f"best vblock {r.best_seconds:.2f} s, qemu-img {r.peer_best_seconds:.2f} s; "
                f"median pair time ratio vblock/qemu-img {1 / r.ratio:.2f}x"
                + (f"; {r.written}" if getattr(r, "written", "") else "")
            )
    return 0

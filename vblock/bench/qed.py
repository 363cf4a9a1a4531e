"""``python -m vblock.bench qed``: the QED driver against ``qemu-img bench`` and vblock raw.

Every case uses qemu-img bench's pattern: 8 KiB requests at a 64 KiB step (each request in a new
cluster of a default 64K/4 image), O_DIRECT, through ``vblock.open_image`` (the whole block layer):

* ``alloc-write``: a fresh image without a backing file, so every request allocates. Peers:
  ``qemu-img bench -w -t none -i io_uring`` on a fresh QED image, and vblock raw on a fresh sparse
  file (the same writes into holes).
* ``rewrite`` / ``read``: a fully written 1 GiB region. Peers: vblock raw on a file written the
  same way, and qemu-img bench on a QED image filled by qemu-io.
* ``open-64TiB``: opening a sparse 64 TiB image (iops = opens per second; memory on stderr).
* ``read-1TiB``: 4 KiB random reads across 1 TiB whose every 2 GiB region has an L2 table, with
  the default 64-table cache (resident memory before and after on stderr: the bound holds).

Each case runs in five rounds interleaved with its peers (medians reported, ratios are medians of
per-round ratios), because figures on shared machines drift; vblock's QED and raw runs take turns
going first, so that neither always inherits the state the other left (the file system's, the
CPU caches').
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shutil
import subprocess
import sys
import time
import tracemalloc

import vblock
from vblock.bench import Row, bench_dir, closed_loop, preallocated_file, report
from vblock.hostio import alloc_buffer

BS = 8192
STEP = 65536
REGION = 1 << 30  # bytes rewritten / read (16384 requests of qemu-img bench)
VIRTUAL = 64 << 30  # virtual size of the allocating-write images


def _qemu_img():
    return shutil.which("qemu-img")


def _quiet_create(path, size, **opts):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vblock.create_image(path, "qed", size, **opts)


def _strided(img, depth, duration, write, limit=None):
    """IOPS of ``depth`` requests in flight at BS bytes, STEP apart (wrapping at ``limit``)."""
    bufs = [alloc_buffer(BS) for _ in range(depth)]
    for b in bufs:
        b[:] = b"\x5a" * BS
    counter = itertools.count()
    wrap = (limit // STEP) if limit else None

    if write:
        def submit(_offset, slot):
            i = next(counter)
            return img.submit_write((i % wrap if wrap else i) * STEP, bufs[slot])
    else:
        def submit(_offset, slot):
            i = next(counter)
            return img.submit_read((i % wrap if wrap else i) * STEP, bufs[slot])

    count, elapsed = closed_loop(submit, depth, duration, 1, BS)
    return count / elapsed


def _qemu_bench(path, depth, count, write):
    """IOPS reported by qemu-img bench (its own timing)."""
    cmd = [_qemu_img(), "bench", "-f", "qed", "-t", "none", "-i", "io_uring", "-d", str(depth),
           "-s", str(BS), "-S", str(STEP), "-c", str(count)]
    if write:
        cmd.append("-w")
    out = subprocess.run(cmd + [path], check=True, capture_output=True, text=True).stdout
    secs = float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))
    return count / secs


ENGINE = "auto"  # replaced by the engine the first image really used


def _engine(img):
    global ENGINE
    f = getattr(img.driver, "f", None)
    if f is not None:
        ENGINE = f.engine
    return img


def _median(values):
    values = sorted(v for v in values if v is not None)
    return values[len(values) // 2] if values else None


def _rows(pattern, depth, rounds, *peer_names, bs=BS):
    """Rows from interleaved rounds: each round is (ours, peer1, peer2...) measured back to back.
    IOPS are medians over rounds; ratios are medians of the per-round ratios, so a burst of load
    from elsewhere moves both sides of a ratio together."""
    ours = _median(r[0] for r in rounds)
    out = []
    for k, name in enumerate(peer_names, start=1):
        peer = _median(r[k] for r in rounds)
        row = Row("qed", ENGINE, pattern, bs, depth, ours, ours * bs / 1e6)
        if peer:
            row.against(name, peer)
            row.ratio = _median(r[0] / r[k] for r in rounds if r[k])
        out.append(row)
    return out


def _in_turn(round_no, first, second):
    """``(first(), second())``, run in that order in even rounds and the other way in odd ones."""
    if round_no % 2:
        b = second()
        return first(), b
    a = first()
    return a, second()


def alloc_write(tmp, depths, duration, use_qemu, rounds=5):
    def qed():
        p = os.path.join(tmp, "v-alloc.qed")
        _quiet_create(p, VIRTUAL).close()
        img = _engine(vblock.open_image(p, format="qed"))
        iops = _strided(img, depth, duration, True)
        img.close()
        os.unlink(p)
        return iops

    def raw():
        r = os.path.join(tmp, "v-alloc.raw")
        with open(r, "wb") as fh:
            fh.truncate(VIRTUAL)
        img = vblock.open_image(r, format="raw")
        iops = _strided(img, depth, duration, True)
        img.close()
        os.unlink(r)
        return iops

    rows = []
    for depth in depths:
        results = []
        for n in range(rounds):
            qemu = None
            if use_qemu:
                q = os.path.join(tmp, "q-alloc.qed")
                subprocess.run([_qemu_img(), "create", "-q", "-f", "qed", q, str(VIRTUAL)],
                               check=True)
                qemu = _qemu_bench(q, depth, 4096, True)
                os.unlink(q)
            ours, theirs = _in_turn(n, qed, raw)
            results.append((ours, qemu, theirs))
        rows += _rows("alloc-write", depth, results, "qemu-img bench qed", "vblock raw")
    return rows


def _fill(img, size):
    """Write ``size`` bytes of data from offset 0 (so reads hit written blocks on every side)."""
    chunk = 4 << 20
    buf = alloc_buffer(chunk)
    buf[:] = b"\xa5" * chunk
    futs = [img.submit_write(off, buf) for off in range(0, size, chunk)]
    for fu in futs:
        fu.result()
    img.close()


def steady(tmp, depths, duration, use_qemu, rounds=5):
    rows = []
    qp = os.path.join(tmp, "v-full.qed")
    _fill(_quiet_create(qp, VIRTUAL), REGION)
    rp = preallocated_file(tmp, REGION, "v-full.raw")
    _fill(vblock.open_image(rp, format="raw"), REGION)  # written, not just reserved
    qemu_img_path = None
    if use_qemu:
        qemu_img_path = os.path.join(tmp, "q-full.qed")
        subprocess.run([_qemu_img(), "create", "-q", "-f", "qed", qemu_img_path, str(VIRTUAL)],
                       check=True)
        subprocess.run(["qemu-io", "-f", "qed", "-t", "none", "-c", f"write -P 0xa5 0 {REGION}",
                        qemu_img_path], check=True, capture_output=True)

    def measure(path, fmt):  # at the loops' current depth and pattern
        img = _engine(vblock.open_image(path, format=fmt))
        iops = _strided(img, depth, duration, write, REGION)
        img.close()
        return iops

    for pattern, write in (("rewrite", True), ("read", False)):
        for depth in depths:
            results = []
            for n in range(rounds):
                ours, raw = _in_turn(n, lambda: measure(qp, "qed"), lambda: measure(rp, "raw"))
                qemu = (_qemu_bench(qemu_img_path, depth, REGION // STEP, write)
                        if use_qemu else None)
                results.append((ours, raw, qemu))
            rows += _rows(pattern, depth, results, "vblock raw", "qemu-img bench qed")
    return rows


def _rss_mib():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1 << 20)


def open_big(tmp):
    p = os.path.join(tmp, "big.qed")
    _quiet_create(p, 64 << 40).close()
    times = []
    tracemalloc.start()
    for _ in range(5):
        t = time.perf_counter()
        img = vblock.open_image(p, format="qed")
        times.append(time.perf_counter() - t)
        if len(times) == 1:
            _, peak = tracemalloc.get_traced_memory()
        img.close()
    tracemalloc.stop()
    best = sorted(times)[len(times) // 2]
    print(f"qed open 64 TiB: median {best * 1000:.1f} ms, Python memory peak during the first "
          f"open {peak / (1 << 20):.2f} MiB", file=sys.stderr)
    row = Row("qed", ENGINE, "open-64TiB", 0, 1, 1 / best, 0.0)
    return [row]


def read_wide(tmp, duration):
    span = 1 << 40
    region = 2 << 30
    p = os.path.join(tmp, "wide.qed")
    img = _quiet_create(p, 2 << 40)
    futs = [img.submit_write(off, b"\x11" * 4096) for off in range(0, span, region)]
    for fu in futs:
        fu.result()
    img.close()
    img = vblock.open_image(p, format="qed")
    bufs = [alloc_buffer(4096) for _ in range(16)]
    rnd = random.Random(7)

    def submit(_offset, slot):
        return img.submit_read(rnd.randrange(span // 4096) * 4096, bufs[slot])

    closed_loop(submit, 16, min(duration, 1.0), 1, 4096)  # warm up: the cache fills
    before = _rss_mib()
    count, elapsed = closed_loop(submit, 16, duration, 1, 4096)
    after = _rss_mib()
    cached = len(img.driver.cache)
    img.close()
    print(f"qed reads across 1 TiB: resident {before:.1f} MiB -> {after:.1f} MiB, "
          f"{cached} tables cached (bound 64)", file=sys.stderr)
    return [Row("qed", ENGINE, "read-1TiB", 4096, 16, count / elapsed,
                count / elapsed * 4096 / 1e6)]


def run(duration=1.0, depths=(1, 8, 16), peers=True, cases=("alloc", "steady", "open", "wide")):
    use_qemu = peers and _qemu_img() is not None and shutil.which("qemu-io") is not None
    if peers and not use_qemu:
        print("qemu-img/qemu-io not found: QEMU peers skipped", file=sys.stderr)
    tmp = bench_dir()
    rows = []
    try:
        if "alloc" in cases:
            rows += alloc_write(tmp, depths, duration, use_qemu)
        if "steady" in cases:
            rows += steady(tmp, depths, duration, use_qemu)
        if "open" in cases:
            rows += open_big(tmp)
        if "wide" in cases:
            rows += read_wide(tmp, duration)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m vblock.bench qed",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--duration", type=float, default=1.0,
                    help="seconds per measurement; each case runs 5 interleaved rounds (default 1)")
    ap.add_argument("--depths", default="1,8,16", help="requests in flight (default 1,8,16)")
    ap.add_argument("--no-peer", action="store_true", help="skip qemu-img bench")
    ap.add_argument("--cases", default="alloc,steady,open,wide",
                    help="comma-separated subset of alloc,steady,open,wide")
    args = ap.parse_args(argv)
    depths = tuple(int(d) for d in args.depths.split(","))
    rows = run(args.duration, depths, not args.no_peer, tuple(args.cases.split(",")))
    report(rows, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m vblock.bench qed``: the QED driver against ``qemu-img bench`` and vblock raw.

Every case uses qemu-img bench's pattern: 8 KiB requests at a 64 KiB step (each request in a new
cluster of a default 64K/4 image), O_DIRECT, through ``vblock.open_image`` (the whole block layer):

* ``alloc-write``: a fresh image without a backing file, so every request allocates. Peers:
  ``qemu-img bench -w -t none -i io_uring`` on a fresh QED image, and vblock raw on a fresh sparse
  file (the same writes into holes).
* ``rewrite`` / ``read``: a fully written 1 GiB region. Peers: vblock raw on the same blocks of
  the disk (the QED file opened as raw, each request sent to the host offset QED maps it to), vblock
  raw on a file written the same way, and qemu-img bench on a QED image filled by qemu-io.
* ``open-64TiB``: opening a sparse 64 TiB image (iops = opens per second; memory on stderr).
* ``read-1TiB``: 4 KiB random reads across 1 TiB whose every 2 GiB region has an L2 table, with
  the default 64-table cache (resident memory before and after on stderr: the bound holds).

Each case runs in five rounds interleaved with its peers (medians reported, ratios are medians of
per-round ratios), because figures on shared machines drift; vblock's QED and raw runs take turns
going first, so that neither always inherits the state the other left (the file system's, the
CPU caches'). ``rewrite`` / ``read`` keep the vblock images open and alternate them four times a
round, in slices of a quarter of the duration, and their raw ratios are the medians of those 20
slices (see ``steady``).
"""

from __future__ import annotations

import argparse
import itertools
import os
import random
import re
import shutil
import statistics
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


def _strided(img, depth, duration, write, limit=None, where=None):
    """IOPS of ``depth`` requests in flight at BS bytes, STEP apart (wrapping at ``limit``). With
    ``where`` (a list), request i goes to ``where[i % len(where)]`` instead."""
    bufs = [alloc_buffer(BS) for _ in range(depth)]
    for b in bufs:
        b[:] = b"\x5a" * BS
    counter = itertools.count()
    wrap = (limit // STEP) if limit else None
    if where is not None:
        wrap = len(where)
    else:
        where = range(0, (wrap or 1 << 40) * STEP, STEP)
    op = img.submit_write if write else img.submit_read

    def submit(_offset, slot):
        i = next(counter)
        return op(where[i % wrap if wrap else i], bufs[slot])

    count, elapsed = closed_loop(submit, depth, duration, 1, BS)
    return count / elapsed


def _qemu_bench(path, depth, count, write):
    """IOPS reported by qemu-img bench (its own timing)."""
    cmd = [
        _qemu_img(),
        "bench",
        "-f",
        "qed",
        "-t",
        "none",
        "-i",
        "io_uring",
        "-d",
        str(depth),
        "-s",
        str(BS),
        "-S",
        str(STEP),
        "-c",
        str(count),
    ]
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
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def _rows(pattern, depth, rounds, *peer_names, bs=BS, ratios=None):
    """Rows from interleaved rounds: each round is (ours, peer1, peer2...) measured back to back.
    IOPS are medians over rounds; ratios are medians of the per-round ratios, so a burst of load
    from elsewhere moves both sides of a ratio together. ``ratios`` ({peer number: [ratio...]})
    gives finer-grained ratios for a peer instead."""
    ours = _median(r[0] for r in rounds)
    out = []
    for k, name in enumerate(peer_names, start=1):
        peer = _median(r[k] for r in rounds)
        row = Row("qed", ENGINE, pattern, bs, depth, ours, ours * bs / 1e6)
        if peer:
            row.against(name, peer)
            row.ratio = _median((ratios or {}).get(k) or [r[0] / r[k] for r in rounds if r[k]])
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
                subprocess.run(
                    [_qemu_img(), "create", "-q", "-f", "qed", q, str(VIRTUAL)], check=True
                )
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


def _host_offsets(img, count):
    """Host (file) offsets of guest offsets 0, STEP, ... (``count`` of them), all allocated."""
    out = []
    for run in img.block_status(0, count * STEP):
        if run.host_offset is None:
            raise RuntimeError(f"guest bytes at {run.offset} are not allocated")
        first = -(-run.offset // STEP) * STEP
        out += [
            run.host_offset + g - run.offset for g in range(first, run.offset + run.length, STEP)
        ]
    return out[:count]


def steady(tmp, depths, duration, use_qemu, rounds=5, slices=4):
    """Rewrites and reads of a written region, against two vblock raw peers: the QED file itself
    opened as raw, sent to the very host offsets QED maps each request to (same blocks of the
    disk: the driver's own cost, nothing else), and a raw file written the same way (a different
    place on the disk: on this machine's virtual disk, 8 KiB writes that start 8 KiB into a
    16 KiB unit run 5-7% slower, and ext4 puts part of a grown QED file's data there).

    The vblock images stay open for a (pattern, depth) case, are warmed up (QED's table and
    mappings cached, as in steady use), and then take turns in ``rounds`` x ``slices`` runs of
    ``duration / slices`` seconds each; qemu-img bench runs once a round. The raw ratios are the
    medians of the slices' ratios: the target (0.95) is finer than the drift of this machine
    between one second and the next (two raw files side by side in one-second pairs: 0.68-1.21).
    """
    rows = []
    qp = os.path.join(tmp, "v-full.qed")
    _fill(_quiet_create(qp, VIRTUAL), REGION)
    rp = preallocated_file(tmp, REGION, "v-full.raw")
    _fill(vblock.open_image(rp, format="raw"), REGION)  # written, not just reserved
    qemu_img_path = None
    if use_qemu:
        qemu_img_path = os.path.join(tmp, "q-full.qed")
        subprocess.run(
            [_qemu_img(), "create", "-q", "-f", "qed", qemu_img_path, str(VIRTUAL)], check=True
        )
        subprocess.run(
            [
                "qemu-io",
                "-f",
                "qed",
                "-t",
                "none",
                "-c",
                f"write -P 0xa5 0 {REGION}",
                qemu_img_path,
            ],
            check=True,
            capture_output=True,
        )

    for pattern, write in (("rewrite", True), ("read", False)):
        for depth in depths:
            qed = _engine(vblock.open_image(qp, format="qed"))
            # The same file again, as raw, on purpose (hence no locks); closed before qed (which
            # may truncate).
            same = vblock.open_image(qp, format="raw", locking="off")
            raw = vblock.open_image(rp, format="raw")
            try:
                hosts = _host_offsets(qed, REGION // STEP)
                sides = (
                    lambda t: _strided(qed, depth, t, write, REGION),
                    lambda t: _strided(same, depth, t, write, where=hosts),
                    lambda t: _strided(raw, depth, t, write, REGION),
                )
                for side in sides:
                    side(min(duration, 0.5))
                results, slice_runs = [], []
                for n in range(rounds):
                    here = []
                    for k in range(slices):
                        turn = (n * slices + k) % len(sides)
                        order = list(range(turn, len(sides))) + list(range(turn))
                        iops = [0.0] * len(sides)
                        for i in order:
                            iops[i] = sides[i](duration / slices)
                        here.append(iops)
                    slice_runs += here
                    qemu = (
                        _qemu_bench(qemu_img_path, depth, REGION // STEP, write)
                        if use_qemu
                        else None
                    )
                    results.append(
                        tuple(_median(r[i] for r in here) for i in range(len(sides))) + (qemu,)
                    )
            finally:
                same.close()
                qed.close()
                raw.close()
            rows += _rows(
                pattern,
                depth,
                results,
                "vblock raw, same blocks",
                "vblock raw file",
                "qemu-img bench qed",
                ratios={k: [r[0] / r[k] for r in slice_runs if r[k]] for k in (1, 2)},
            )
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
    print(
        f"qed open 64 TiB: median {best * 1000:.1f} ms, Python memory peak during the first "
        f"open {peak / (1 << 20):.2f} MiB",
        file=sys.stderr,
    )
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
    print(
        f"qed reads across 1 TiB: resident {before:.1f} MiB -> {after:.1f} MiB, "
        f"{cached} tables cached (bound 64)",
        file=sys.stderr,
    )
    return [
        Row("qed", ENGINE, "read-1TiB", 4096, 16, count / elapsed, count / elapsed * 4096 / 1e6)
    ]


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
    ap = argparse.ArgumentParser(
        prog="python -m vblock.bench qed", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument(
        "--duration",
        type=float,
        default=1.0,
        help="seconds per measurement; each case runs 5 interleaved rounds (default 1)",
    )
    ap.add_argument("--depths", default="1,8,16", help="requests in flight (default 1,8,16)")
    ap.add_argument("--no-peer", action="store_true", help="skip qemu-img bench")
    ap.add_argument(
        "--cases",
        default="alloc,steady,open,wide",
        help="comma-separated subset of alloc,steady,open,wide",
    )
    args = ap.parse_args(argv)
    depths = tuple(int(d) for d in args.depths.split(","))
    rows = run(args.duration, depths, not args.no_peer, tuple(args.cases.split(",")))
    report(rows, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

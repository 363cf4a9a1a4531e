"""``python -m vblock.bench nbd``: vblock's NBD server and client against QEMU's, same run.

Server rows: ``qemu-img bench -f raw -t none -s 8k -d DEPTH [-w]`` over a unix socket, against
``vblock serve --nbd`` and against ``qemu-nbd --cache=none --aio=io_uring``, each serving its own
preallocated raw file of the same size on the same file system (the image locks keep two servers
off one file). ``vblock serve --nbd`` runs with its default engine for NBD, the thread engine.
The load generator and its timing are QEMU's on both sides; IOPS are requests over the run time
it reports.

Client rows: vblock opens the qemu-nbd export as a raw image (``vblock.open_image(URI)``) and keeps
16 random 8 KiB writes, then reads, in flight for ``--duration`` seconds; the peer is
``qemu-img bench`` over the same export at the same depth (sequential 8 KiB requests: qemu-img
bench has no random mode, and a raw export served by qemu-nbd from O_DIRECT pays the same for
either).

Both servers run while all rows are taken; every case runs ``--rounds`` rounds with the two sides
back to back, alternating which goes first. IOPS are medians over rounds, ratios medians of the
per-round ratios (> 1: vblock is faster). The machine may be shared: read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys

from vblock.bench import Row, bench_dir, closed_loop, preallocated_file, report

BS = 8192
SIZE = 256 << 20
COUNT = 20000  # requests per qemu-img bench run


def _uri(sock):
    return f"nbd+unix:///?socket={sock}"


def qemu_img_bench(uri, depth, write, count=COUNT):
    """IOPS that ``qemu-img bench`` reports over ``uri`` (its own timing)."""
    cmd = (
        [
            "qemu-img",
            "bench",
            "-f",
            "raw",
            "-t",
            "none",
            "-d",
            str(depth),
            "-s",
            str(BS),
            "-c",
            str(count),
        ]
        + (["-w"] if write else [])
        + [uri]
    )
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    return count / float(re.search(r"Run completed in ([0-9.]+) seconds", out).group(1))


def start_vblock(sock, path):
    """``vblock serve --nbd`` in a child process; returns it once it listens."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vblock.cli.main",
            "serve",
            "--nbd",
            sock,
            "--shared",
            "0",
            "-f",
            "raw",
            path,
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stderr.readline()
    if "on nbd" not in line:
        proc.kill()
        raise RuntimeError(f"vblock serve did not start: {line}{proc.stderr.read()}")
    return proc


def start_qemu_nbd(sock, path, pidfile):
    """``qemu-nbd`` forked once it listens; returns its pid."""
    subprocess.run(
        [
            "qemu-nbd",
            "--fork",
            "--pid-file",
            pidfile,
            "--persistent",
            "--shared=0",
            "--cache=none",
            "--aio=io_uring",
            "-f",
            "raw",
            "-k",
            sock,
            path,
        ],
        check=True,
    )
    with open(pidfile) as f:
        return int(f.read())


def vblock_client(uri, depth, write, duration):
    """IOPS of random 8 KiB requests through ``vblock.open_image(uri)`` (raw over NbdFile)."""
    import vblock
    from vblock.hostio import alloc_buffer

    img = vblock.open_image(uri, format="raw")
    try:
        bufs = [alloc_buffer(BS) for _ in range(depth)]
        for b in bufs:
            b[:] = b"\x5a" * BS
        op = img.submit_write if write else img.submit_read

        def submit(offset, slot):
            return op(offset, [bufs[slot]])

        count, elapsed = closed_loop(submit, depth, duration, img.size // BS, BS)
    finally:
        img.close()
    return count / elapsed


def _paired(rounds, ours, peer):
    """[(ours, peer)] for ``rounds`` rounds, alternating which side runs first."""
    out = []
    for n in range(rounds):
        if n % 2:
            b = peer()
            out.append((ours(), b))
        else:
            a = ours()
            out.append((a, peer()))
    return out


def _row(layer, engine, pattern, depth, pairs, peer_name):
    ours = statistics.median(p[0] for p in pairs)
    theirs = statistics.median(p[1] for p in pairs)
    ratio = statistics.median(p[0] / p[1] for p in pairs)
    return Row(layer, engine, pattern, BS, depth, ours, ours * BS / 1e6).against(
        peer_name, theirs, ratio
    )


def run(rounds=3, depths=(16, 1), duration=2.0, count=COUNT, client=True):
    tmp = bench_dir()
    rows = []
    vb = qpid = None
    try:
        vfile = preallocated_file(tmp, SIZE, "vblock.raw")
        qfile = preallocated_file(tmp, SIZE, "qemu.raw")
        vsock, qsock = os.path.join(tmp, "vblock.sock"), os.path.join(tmp, "qemu.sock")
        vb = start_vblock(vsock, vfile)
        qpid = start_qemu_nbd(qsock, qfile, os.path.join(tmp, "qemu.pid"))
        for depth in depths:
            for write in (True, False):
                pairs = _paired(
                    rounds,
                    lambda: qemu_img_bench(_uri(vsock), depth, write, count),
                    lambda: qemu_img_bench(_uri(qsock), depth, write, count),
                )
                rows.append(
                    _row(
                        "nbd server",
                        "serve (threads)",
                        "write" if write else "read",
                        depth,
                        pairs,
                        "qemu-nbd none+io_uring",
                    )
                )
        if client:
            for write in (True, False):
                pairs = _paired(
                    rounds,
                    lambda: vblock_client(_uri(qsock), 16, write, duration),
                    lambda: qemu_img_bench(_uri(qsock), 16, write, count),
                )
                rows.append(
                    _row(
                        "nbd client",
                        "NbdFile",
                        "randwrite" if write else "randread",
                        16,
                        pairs,
                        "qemu-img bench (NBD client)",
                    )
                )
    finally:
        if vb is not None:
            vb.send_signal(signal.SIGTERM)
            vb.wait(60)
        if qpid is not None:
            try:
                os.kill(qpid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m vblock.bench nbd", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per case (default 3)")
    ap.add_argument(
        "--depths", default="16,1", help="server rows: requests in flight (default 16,1)"
    )
    ap.add_argument("--count", type=int, default=COUNT, help="requests per qemu-img bench run")
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per vblock client run")
    ap.add_argument("--no-client", action="store_true", help="server rows only")
    args = ap.parse_args(argv)
    missing = [t for t in ("qemu-img", "qemu-nbd") if shutil.which(t) is None]
    if missing:
        print(f"nbd benchmark needs {', '.join(missing)} (apt: qemu-utils)", file=sys.stderr)
        return 2
    rows = run(
        args.rounds,
        tuple(int(d) for d in args.depths.split(",")),
        args.duration,
        args.count,
        not args.no_client,
    )
    report(rows, as_json=args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

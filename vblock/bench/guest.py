"""``vblock bench guest``: a real Linux guest's disk throughput on ``vblock serve`` against
``qemu-storage-daemon``. The VM (kernel, initramfs, QEMU command line, console markers) is
``vblock.testing.vm``'s, which ``tests/guest`` uses too.

The benchmark (:func:`main`): the same in-guest workload - 64 MiB of ``dd`` O_DIRECT writes, then
reads, in 64 KiB blocks, timed by the guest's own clock - on copies of one image (each written
back and dropped from the page cache before its server starts) served by
``vblock serve`` and by ``qemu-storage-daemon`` (O_DIRECT on both), in the same run, alternating,
best of ``--rounds`` for the figures; the ratio is the median over rounds of vblock / qsd measured
back to back (the host is shared, so pairing cancels most of the drift in its load). A third server, qsd's ``null-co`` driver (no
storage at all), measures what the guest and the vhost-user path cost by themselves under TCG.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time

from vblock.testing.vm import Serve, boot, missing

QSD = "qemu-storage-daemon"


# -- the benchmark ----------------------------------------------------------------------------------
BENCH_MIB = 64
BENCH_BS = 65536
BENCH_SCRIPT = """
c=$((%(mib)d * 1048576 / %(bs)d))
# The kernel's clock in ns ("now at" in /proc/timer_list); /proc/uptime (10 ms steps, 2-3 %% of a
# phase here) only where that file is missing.
now() { v=$(grep -m1 'now at' /proc/timer_list 2>/dev/null | cut -d' ' -f3); echo "${v:-u$(cut -d' ' -f1 /proc/uptime)}"; }
t0=$(now)
dd if=/dev/zero of=/dev/vda bs=%(bs)d count=$c oflag=direct 2>/dev/null || exit 3
t1=$(now)
dd if=/dev/vda of=/dev/null bs=%(bs)d count=$c iflag=direct 2>/dev/null || exit 4
t2=$(now)
echo "VBG t0=$t0 t1=$t1 t2=$t2"
"""


def _seconds(stamp):
    """A BENCH_SCRIPT time stamp in seconds: nanoseconds, or ``u`` and /proc/uptime's seconds."""
    return float(stamp[1:]) if stamp.startswith("u") else int(stamp) / 1e9


class QsdServe:
    """``qemu-storage-daemon`` exporting ``image`` (or a null-co disk when ``fmt`` is "null")."""

    def __init__(self, sock, image, fmt, size):
        if fmt == "null":
            nodes = ["--blockdev", f"driver=null-co,node-name=disk0,size={size},read-zeroes=on"]
        else:
            nodes = [
                "--blockdev",
                f"driver=file,node-name=file0,filename={image},cache.direct=on",
                "--blockdev",
                f"driver={fmt},node-name=disk0,file=file0,cache.direct=on",
            ]
        self.sock = sock
        self.proc = subprocess.Popen(
            [
                QSD,
                *nodes,
                "--export",
                f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                f"addr.path={sock},writable=on,num-queues=1",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    f"qemu-storage-daemon did not start: {self.proc.stderr.read().decode()[-500:]}"
                )
            time.sleep(0.02)

    def stop(self):
        self.proc.terminate()
        return self.proc.wait(60), ""


def _run_once(server, directory):
    m = boot(server.sock, BENCH_SCRIPT % {"mib": BENCH_MIB, "bs": BENCH_BS}, directory, timeout=300)
    rc, _ = server.stop()
    if m.get("exit") != "0" or "t2" not in m:
        raise RuntimeError(f"guest workload failed (server rc {rc}):\n{m['_console'][-1500:]}")
    t0, t1, t2 = (_seconds(m[k]) for k in ("t0", "t1", "t2"))
    mb = BENCH_MIB * (1 << 20) / 1e6
    return mb / max(t1 - t0, 1e-3), mb / max(t2 - t1, 1e-3)


def main(argv=None):
    import argparse

    from vblock.bench import Row, bench_dir, report, settle_file

    p = argparse.ArgumentParser(prog="vblock bench guest", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--rounds", type=int, default=5, help="boots per server and format (default 5)")
    p.add_argument("--formats", default="raw,qed")
    p.add_argument(
        "--serve-args", default="", help="extra options for vblock serve (e.g. '--aio threads')"
    )
    args = p.parse_args(argv)
    why = missing()
    if why:
        print(f"bench guest: skipped: {why}", file=sys.stderr)
        return 0
    if shutil.which(QSD) is None:
        print(f"bench guest: skipped: {QSD} not installed", file=sys.stderr)
        return 0
    d = bench_dir()
    size = 2 * BENCH_MIB << 20
    rows = []
    try:
        best = {}
        ratios = {}
        formats = [f for f in args.formats.split(",") if f]
        for fmt in formats:
            src = os.path.join(d, f"src.{fmt}")
            subprocess.run(
                ["qemu-img", "create", "-f", fmt, src, str(size)], check=True, capture_output=True
            )
            for r in range(args.rounds):
                got = {}
                # the two servers run back to back, in alternating order, so each round's ratio
                # sees the same host load (this 2-core host is shared)
                for who in ("vblock", "qsd") if r % 2 == 0 else ("qsd", "vblock"):
                    img = os.path.join(d, f"{who}.{fmt}")
                    shutil.copyfile(src, img)  # sendfile: every block written, and dirty
                    settle_file(img)
                    sock = os.path.join(d, f"{who}.sock")
                    srv = (
                        Serve(sock, img, "-f", fmt, *args.serve_args.split())
                        if who == "vblock"
                        else QsdServe(sock, img, fmt, size)
                    )
                    got[who] = _run_once(srv, d)
                    bw, br = best.get((fmt, who), (0, 0))
                    best[(fmt, who)] = (max(bw, got[who][0]), max(br, got[who][1]))
                    os.unlink(img)
                for i in (0, 1):
                    ratios.setdefault((fmt, i), []).append(got["vblock"][i] / got["qsd"][i])
        for _ in range(args.rounds):
            w, rd = _run_once(QsdServe(os.path.join(d, "null.sock"), None, "null", size), d)
            bw, br = best.get(("null", "qsd"), (0, 0))
            best[("null", "qsd")] = (max(bw, w), max(br, rd))
        for fmt in formats:
            for i, pattern in enumerate(("write", "read")):
                mine, peer = best[(fmt, "vblock")][i], best[(fmt, "qsd")][i]
                row = Row("guest", fmt, pattern, BENCH_BS, 1, mine * 1e6 / BENCH_BS, mine)
                row.against("qemu-storage-daemon", peer * 1e6 / BENCH_BS)
                row.ratio = statistics.median(ratios[(fmt, i)])  # of the back-to-back pairs
                rows.append(row)
        for i, pattern in enumerate(("write", "read")):
            v = best[("null", "qsd")][i]
            rows.append(Row("guest", "qsd-null-co", pattern, BENCH_BS, 1, v * 1e6 / BENCH_BS, v))
    finally:
        shutil.rmtree(d, ignore_errors=True)
    report(rows, args.json)
    if not args.json:
        print(
            "\nguest: 1 vCPU under QEMU TCG, dd 64 KiB O_DIRECT, 64 MiB each way, guest clock; best of "
            f"{args.rounds} rounds; ratio = median of back-to-back vblock/qsd pairs; qsd-null-co = the guest "
            "and vhost-user path with no storage behind them"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``vblock bench guest``: a real Linux guest's disk throughput on ``vblock serve`` against
``qemu-storage-daemon``, and the VM machinery it shares with ``tests/guest``.

A Debian cloud kernel and a busybox initramfs boot under QEMU TCG (q35) on a vhost-user-blk disk
(recipe: shared/reference/vhost-user-guest.md).

Artifacts are built once into a cache outside the repository (``$VBLOCK_GUEST_CACHE``, default
``~/.cache/vblock-guest``): ``vmlinuz`` and ``base.cpio.gz`` (busybox, the virtio modules and an
``/init`` that loads them, runs ``/scenario.sh`` and powers off). Each test appends its own
uncompressed cpio holding ``/scenario.sh`` (Linux unpacks concatenated archives in order), so one
cached kernel and base serve every scenario. Results travel as marker lines on the serial console:
``VBG <key>=<value>``.

``missing()`` names what is not available (for a skip reason); nothing here installs packages -
``.ci/guest-deps.sh`` does (the .debs are fetched with ``apt-get download`` on first use if absent).

The benchmark (:func:`main`): the same in-guest workload - 64 MiB of ``dd`` O_DIRECT writes, then
reads, in 64 KiB blocks, timed by the guest's own clock - on copies of one image (each written
back and dropped from the page cache before its server starts) served by
``vblock serve`` and by ``qemu-storage-daemon`` (O_DIRECT on both), in the same run, alternating,
best of ``--rounds`` for the figures; the ratio is the median over rounds of vblock / qsd measured
back to back (the host is shared, so pairing cancels most of the drift in its load). A third server, qsd's ``null-co`` driver (no
storage at all), measures what the guest and the vhost-user path cost by themselves under TCG.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("VBLOCK_GUEST_CACHE") or os.path.expanduser("~/.cache/vblock-guest")
QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
BOOT_TIMEOUT = 90  # seconds for one QEMU run (a boot is ~2.5 s idle, ~5 s on a busy host)
MODULES = ("virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci", "virtio_blk")
APPLETS = ("sh", "mount", "umount", "insmod", "dd", "sha256sum", "cut", "cat", "head", "yes", "cmp", "sleep",
           "blockdev", "poweroff", "mke2fs", "mkfs.ext2", "blkdiscard", "sync", "echo", "ls", "mkdir", "rm",
           "seq", "wait", "tr", "wc", "sed", "grep", "true", "false", "test", "[", "printf", "awk", "stat",
           "uptime", "time", "date", "expr", "tail", "taskset", "nproc")
MARK = "VBG "

INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in %s; do insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
echo "VBG boot=$(cut -d' ' -f1 /proc/uptime)"
if [ -b /dev/vda ]; then sh /scenario.sh; echo "VBG exit=$?"; else echo "VBG exit=novda"; fi
echo "VBG done=1"
poweroff -f
""" % " ".join(MODULES)


def missing():
    """Why the guest tests cannot run here, or None."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "guest tests need an x86-64 Linux host"
    for tool in (QEMU, "qemu-img"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (run .ci/guest-deps.sh: Debian qemu-system-x86, qemu-utils)"
    try:
        artifacts()
    except RuntimeError as exc:
        return str(exc)
    return None


# -- building the kernel and initramfs (once) -----------------------------------------------------
def _debs():
    d = os.path.join(CACHE, "debs")
    kernel = sorted(glob.glob(os.path.join(d, "linux-image-[0-9]*-cloud-amd64_*.deb")))
    bb = sorted(glob.glob(os.path.join(d, "busybox-static_*.deb")))
    if kernel and bb:
        return kernel[-1], bb[-1]
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"no kernel/busybox packages in {d} and no apt-get to download them")
    os.makedirs(d, exist_ok=True)
    try:
        subprocess.run(["apt-get", "download", "busybox-static", "linux-image-cloud-amd64"], cwd=d, check=True,
                       capture_output=True, timeout=300)
        meta = sorted(glob.glob(os.path.join(d, "linux-image-cloud-amd64_*.deb")))[-1]
        dep = subprocess.run(["dpkg-deb", "-f", meta, "Depends"], check=True, capture_output=True, text=True).stdout
        kpkg = dep.split()[0].split("(")[0].strip(",")
        subprocess.run(["apt-get", "download", kpkg], cwd=d, check=True, capture_output=True, timeout=600)
    except (subprocess.SubprocessError, OSError, IndexError) as exc:
        raise RuntimeError(f"cannot download linux-image-cloud-amd64 / busybox-static: {exc}") from None
    return _debs()


def artifacts():
    """(vmlinuz, base initramfs) paths, built into the cache on first use."""
    vmlinuz = os.path.join(CACHE, "vmlinuz")
    # the base's name carries a digest of what goes into it, so a changed /init rebuilds it
    key = hashlib.sha256((INIT + " ".join(APPLETS + MODULES)).encode()).hexdigest()[:12]
    base = os.path.join(CACHE, f"base-{key}.cpio.gz")
    if os.path.exists(vmlinuz) and os.path.exists(base):
        return vmlinuz, base
    kdeb, bbdeb = _debs()
    os.makedirs(CACHE, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE) as tmp:
        kx = os.path.join(tmp, "k")
        os.makedirs(kx)
        tar = subprocess.Popen(["tar", "-x", "-C", kx, "--wildcards", "./boot/vmlinuz-*",
                                "./lib/modules/*/kernel/drivers/virtio/virtio*.ko",
                                "./lib/modules/*/kernel/drivers/block/virtio_blk.ko"], stdin=subprocess.PIPE)
        dpkg = subprocess.run(["dpkg-deb", "--fsys-tarfile", kdeb], stdout=tar.stdin, check=True)
        tar.stdin.close()
        if tar.wait() or dpkg.returncode:
            raise RuntimeError(f"cannot unpack {kdeb}")
        bbx = os.path.join(tmp, "bb")
        subprocess.run(["dpkg", "-x", bbdeb, bbx], check=True)
        with open(os.path.join(bbx, "bin", "busybox"), "rb") as f:
            busybox = f.read()
        files = [("bin", None, 0o755), ("proc", None, 0o755), ("sys", None, 0o755), ("dev", None, 0o755),
                 ("tmp", None, 0o1777), ("mnt", None, 0o755), ("lib", None, 0o755),
                 ("lib/modules", None, 0o755), ("bin/busybox", busybox, 0o755)]
        files += [(f"bin/{a}", "busybox", "link") for a in APPLETS]
        for m in MODULES:
            (ko,) = glob.glob(os.path.join(kx, "lib/modules/*/kernel/drivers/*", m + ".ko"))
            with open(ko, "rb") as f:
                files.append((f"lib/modules/{m}.ko", f.read(), 0o644))
        files.append(("init", INIT.encode(), 0o755))
        with open(base + ".tmp", "wb") as out:
            out.write(gzip.compress(cpio(files), 6))
        (vm,) = glob.glob(os.path.join(kx, "boot", "vmlinuz-*"))
        shutil.copyfile(vm, vmlinuz + ".tmp")
        os.replace(vmlinuz + ".tmp", vmlinuz)
        os.replace(base + ".tmp", base)
    return vmlinuz, base


def cpio(files):
    """A newc cpio archive of ``[(path, data | None for a directory | link target, mode | "link")]``."""
    out = io.BytesIO()
    ino = 1
    for path, data, mode in files + [("TRAILER!!!", b"", 0)]:
        if mode == "link":
            body, m = data.encode(), 0o120777
        elif data is None:
            body, m = b"", 0o040000 | mode
        else:
            body, m = data, (0o100000 | mode) if path != "TRAILER!!!" else 0
        name = path.encode() + b"\0"
        hdr = "070701" + "".join(f"{v:08x}" for v in (
            ino, m, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name), 0))
        out.write(hdr.encode() + name)
        out.write(b"\0" * (-(110 + len(name)) % 4))
        out.write(body)
        out.write(b"\0" * (-len(body) % 4))
        ino += 1
    out.write(b"\0" * (-out.tell() % 512))
    return out.getvalue()


def initrd_for(script, directory):
    """The base initramfs plus ``/scenario.sh`` = ``script``; returns the new file's path."""
    _, base = artifacts()
    path = os.path.join(directory, "initrd.img")
    with open(base, "rb") as f, open(path, "wb") as out:
        data = f.read()
        out.write(data)
        out.write(b"\0" * (-len(data) % 512))  # the kernel looks for the next archive 4-byte aligned
        out.write(cpio([("scenario.sh", script.encode(), 0o755)]))
    return path


# -- running ----------------------------------------------------------------------------------------
def wait_for_server(log_path, proc, timeout=30.0):
    """Poll (bounded) until the server says it listens (its first stderr line is written after the
    socket is bound, so a stale socket file left by a killed server does not count)."""
    deadline = time.monotonic() + timeout
    while True:
        with open(log_path, "rb") as f:
            if b" on " in f.read():
                return
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"server not listening after {timeout} s")
        time.sleep(0.02)


class Serve:
    """``vblock serve --vhost-user`` in a child process (``python -m vblock.cli.main serve``)."""

    def __init__(self, sock, image, *args):
        self.sock = sock
        self.stderr_path = sock + ".log"
        self._err = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "vblock.cli.main", "serve", "--vhost-user", sock, image, *args],
                                     stdout=subprocess.DEVNULL, stderr=self._err)
        wait_for_server(self.stderr_path, self.proc)

    def stop(self, sig=signal.SIGTERM, timeout=60):
        """Send ``sig``; returns (exit status, stderr text)."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._err.close()
        with open(self.stderr_path, errors="replace") as f:
            return rc, f.read()

    def flushes(self, text):
        m = re.search(r"closed .*: (\d+) flushes", text)
        return int(m.group(1)) if m else None


def qemu_cmd(sock, vmlinuz, initrd, queues=1, smp=1, mem_mb=512):
    return [QEMU, "-machine", "q35", "-accel", "tcg", "-nic", "none", "-m", f"{mem_mb}M", "-smp", str(smp),
            "-object", f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on", "-numa", "node,memdev=mem",
            "-chardev", f"socket,id=c0,path={sock}",
            "-device", f"vhost-user-blk-pci,chardev=c0,num-queues={queues}",
            "-kernel", vmlinuz, "-initrd", initrd, "-append", "console=ttyS0 quiet panic=-1",
            "-nographic", "-no-reboot", "-serial", "mon:stdio"]


def boot(sock, script, directory, queues=1, smp=1, timeout=BOOT_TIMEOUT, on_line=None):
    """Boot the guest on the vhost-user socket ``sock`` running ``script``; returns the markers as
    a dict (``VBG key=value`` lines; repeated keys keep the last) plus ``_console`` (the whole
    console). ``on_line(line)`` sees each console line as it arrives; when it returns True the VM
    is killed there (``_rc`` is then negative)."""
    vmlinuz, _ = artifacts()
    initrd = initrd_for(script, directory)
    cmd = ["timeout", "-k", "5", str(timeout)] + qemu_cmd(sock, vmlinuz, initrd, queues, smp)
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines = []
    markers = {}
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
            lines.append(line)
            i = line.find(MARK)
            if i >= 0:
                for kv in line[i + len(MARK):].split():
                    k, _, v = kv.partition("=")
                    markers[k] = v
            if on_line is not None and on_line(line):
                proc.terminate()  # timeout(1) passes SIGTERM on to QEMU
                break
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout + 10)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    markers["_rc"] = proc.returncode
    markers["_console"] = "\n".join(lines)
    return markers


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
            nodes = ["--blockdev", f"driver=file,node-name=file0,filename={image},cache.direct=on",
                     "--blockdev", f"driver={fmt},node-name=disk0,file=file0,cache.direct=on"]
        self.sock = sock
        self.proc = subprocess.Popen([QSD, *nodes, "--export",
                                      f"type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,"
                                      f"addr.path={sock},writable=on,num-queues=1"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"qemu-storage-daemon did not start: {self.proc.stderr.read().decode()[-500:]}")
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
    p.add_argument("--serve-args", default="", help="extra options for vblock serve (e.g. '--aio threads')")
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
            subprocess.run(["qemu-img", "create", "-f", fmt, src, str(size)], check=True, capture_output=True)
            for r in range(args.rounds):
                got = {}
                # the two servers run back to back, in alternating order, so each round's ratio
                # sees the same host load (this 2-core host is shared)
                for who in ("vblock", "qsd") if r % 2 == 0 else ("qsd", "vblock"):
                    img = os.path.join(d, f"{who}.{fmt}")
                    shutil.copyfile(src, img)  # sendfile: every block written, and dirty
                    settle_file(img)
                    sock = os.path.join(d, f"{who}.sock")
                    srv = (Serve(sock, img, "-f", fmt, *args.serve_args.split()) if who == "vblock"
                           else QsdServe(sock, img, fmt, size))
                    got[who] = _run_once(srv, d)
                    bw, br = best.get((fmt, who), (0, 0))
                    best[(fmt, who)] = (max(bw, got[who][0]), max(br, got[who][1]))
                    os.unlink(img)
                for i in (0, 1):
                    ratios.setdefault((fmt, i), []).append(got["vblock"][i] / got["qsd"][i])
        for r in range(args.rounds):
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
        print("\nguest: 1 vCPU under QEMU TCG, dd 64 KiB O_DIRECT, 64 MiB each way, guest clock; best of "
              f"{args.rounds} rounds; ratio = median of back-to-back vblock/qsd pairs; qsd-null-co = the guest "
              "and vhost-user path with no storage behind them")
    return 0


if __name__ == "__main__":
    sys.exit(main())

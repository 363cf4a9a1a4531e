"""The VM harness: a real Linux guest booted under QEMU on a ``vblock serve`` vhost-user disk,
for ``tests/guest`` and ``vblock bench guest``.

A Debian cloud kernel and a busybox initramfs boot under QEMU TCG (q35) on a vhost-user-blk disk
(recipe: shared/reference/vhost-user-guest.md).

Artifacts are built once into a cache outside the repository (``$VBLOCK_GUEST_CACHE``, default
``~/.cache/vblock-guest``): ``vmlinuz`` and ``base.cpio.gz`` (busybox, the virtio modules and an
``/init`` that loads them, runs ``/scenario.sh`` and powers off). Each run appends its own
uncompressed cpio holding ``/scenario.sh`` (Linux unpacks concatenated archives in order), so one
cached kernel and base serve every scenario. Results travel as marker lines on the serial console:
``VBG <key>=<value>``; ``boot`` returns them as a dict.

``missing()`` names what is not available (for a skip reason); nothing here installs packages -
``.ci/guest-deps.sh`` does (the .debs are fetched with ``apt-get download`` on first use if absent).
``Serve`` runs ``vblock serve --vhost-user`` in a child process; ``qemu_cmd`` is the QEMU command
line; ``boot`` runs one VM to its end (or until ``on_line`` stops it) from the calling thread.
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
import subprocess
import sys
import tempfile
import time

CACHE = os.environ.get("VBLOCK_GUEST_CACHE") or os.path.expanduser("~/.cache/vblock-guest")
QEMU = "qemu-system-x86_64"
BOOT_TIMEOUT = 90  # seconds for one QEMU run (a boot is ~2.5 s idle, ~5 s on a busy host)
MODULES = (
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
)
APPLETS = (
    "sh",
    "mount",
    "umount",
    "insmod",
    "dd",
    "sha256sum",
    "cut",
    "cat",
    "head",
    "yes",
    "cmp",
    "sleep",
    "blockdev",
    "poweroff",
    "mke2fs",
    "mkfs.ext2",
    "blkdiscard",
    "sync",
    "echo",
    "ls",
    "mkdir",
    "rm",
    "seq",
    "wait",
    "tr",
    "wc",
    "sed",
    "grep",
    "true",
    "false",
    "test",
    "[",
    "printf",
    "awk",
    "stat",
    "uptime",
    "time",
    "date",
    "expr",
    "tail",
    "taskset",
    "nproc",
)
MARK = "VBG "

INIT = """#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do insmod /lib/modules/$m.ko; done
i=0
while [ ! -b /dev/vda ] && [ $i -lt 400 ]; do sleep 0.05; i=$((i+1)); done
echo "VBG boot=$(cut -d' ' -f1 /proc/uptime)"
if [ -b /dev/vda ]; then sh /scenario.sh; echo "VBG exit=$?"; else echo "VBG exit=novda"; fi
echo "VBG done=1"
poweroff -f
""".replace("@MODULES@", " ".join(MODULES))


def missing():
    """Why the guest tests cannot run here, or None."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "guest tests need an x86-64 Linux host"
    for tool in (QEMU, "qemu-img"):
        if shutil.which(tool) is None:
            return (
                f"{tool} not installed (run .ci/guest-deps.sh: Debian qemu-system-x86, qemu-utils)"
            )
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
        subprocess.run(
            ["apt-get", "download", "busybox-static", "linux-image-cloud-amd64"],
            cwd=d,
            check=True,
            capture_output=True,
            timeout=300,
        )
        meta = sorted(glob.glob(os.path.join(d, "linux-image-cloud-amd64_*.deb")))[-1]
        dep = subprocess.run(
            ["dpkg-deb", "-f", meta, "Depends"], check=True, capture_output=True, text=True
        ).stdout
        kpkg = dep.split()[0].split("(")[0].strip(",")
        subprocess.run(
            ["apt-get", "download", kpkg], cwd=d, check=True, capture_output=True, timeout=600
        )
    except (subprocess.SubprocessError, OSError, IndexError) as exc:
        raise RuntimeError(
            f"cannot download linux-image-cloud-amd64 / busybox-static: {exc}"
        ) from None
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
        tar = subprocess.Popen(
            [
                "tar",
                "-x",
                "-C",
                kx,
                "--wildcards",
                "./boot/vmlinuz-*",
                "./lib/modules/*/kernel/drivers/virtio/virtio*.ko",
                "./lib/modules/*/kernel/drivers/block/virtio_blk.ko",
            ],
            stdin=subprocess.PIPE,
        )
        dpkg = subprocess.run(["dpkg-deb", "--fsys-tarfile", kdeb], stdout=tar.stdin, check=True)
        tar.stdin.close()
        if tar.wait() or dpkg.returncode:
            raise RuntimeError(f"cannot unpack {kdeb}")
        bbx = os.path.join(tmp, "bb")
        subprocess.run(["dpkg", "-x", bbdeb, bbx], check=True)
        with open(os.path.join(bbx, "bin", "busybox"), "rb") as f:
            busybox = f.read()
        files = [
            ("bin", None, 0o755),
            ("proc", None, 0o755),
            ("sys", None, 0o755),
            ("dev", None, 0o755),
            ("tmp", None, 0o1777),
            ("mnt", None, 0o755),
            ("lib", None, 0o755),
            ("lib/modules", None, 0o755),
            ("bin/busybox", busybox, 0o755),
        ]
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
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (ino, m, 0, 0, 1, 0, len(body), 0, 0, 0, 0, len(name), 0)
        )
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
        out.write(
            b"\0" * (-len(data) % 512)
        )  # the kernel looks for the next archive 4-byte aligned
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
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vblock.cli.main", "serve", "--vhost-user", sock, image, *args],
            stdout=subprocess.DEVNULL,
            stderr=self._err,
        )
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
    return [
        QEMU,
        "-machine",
        "q35",
        "-accel",
        "tcg",
        "-nic",
        "none",
        "-m",
        f"{mem_mb}M",
        "-smp",
        str(smp),
        "-object",
        f"memory-backend-memfd,id=mem,size={mem_mb}M,share=on",
        "-numa",
        "node,memdev=mem",
        "-chardev",
        f"socket,id=c0,path={sock}",
        "-device",
        f"vhost-user-blk-pci,chardev=c0,num-queues={queues}",
        "-kernel",
        vmlinuz,
        "-initrd",
        initrd,
        "-append",
        "console=ttyS0 quiet panic=-1",
        "-nographic",
        "-no-reboot",
        "-serial",
        "mon:stdio",
    ]


def boot(sock, script, directory, queues=1, smp=1, timeout=BOOT_TIMEOUT, on_line=None):
    """Boot the guest on the vhost-user socket ``sock`` running ``script``; returns the markers as
    a dict (``VBG key=value`` lines; repeated keys keep the last) plus ``_console`` (the whole
    console). ``on_line(line)`` sees each console line as it arrives; when it returns True the VM
    is killed there (``_rc`` is then negative)."""
    vmlinuz, _ = artifacts()
    initrd = initrd_for(script, directory)
    cmd = ["timeout", "-k", "5", str(timeout)] + qemu_cmd(sock, vmlinuz, initrd, queues, smp)
    proc = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines = []
    markers = {}
    try:
        for raw in proc.stdout:
            line = raw.decode(errors="replace").replace("\r", "").rstrip("\n")
            lines.append(line)
            i = line.find(MARK)
            if i >= 0:
                for kv in line[i + len(MARK) :].split():
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
        proc.stdout.close()
    markers["_rc"] = proc.returncode
    markers["_console"] = "\n".join(lines)
    return markers

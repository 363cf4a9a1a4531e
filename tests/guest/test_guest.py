"""A real Linux guest (Debian cloud kernel, busybox initramfs, QEMU TCG, q35) on ``vblock serve
--vhost-user`` disks: one test per scenario of issue 8, over raw and QED images.

Each test: make an image, start ``vblock serve`` on it, boot a guest whose ``/scenario.sh`` does
the work and prints ``VBG key=value`` markers on the serial console, stop the server with SIGTERM
(it must exit 0 and report its flush count), then verify the image on the host.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess

import pytest

from tests.guest import harness
from tests.guest.guest_helpers import (
    HOST_PATTERN,
    HOST_PATTERN_OFFSET,
    MiB,
    image_bytes,
    make_disk,
    qemu_img_check,
)

pytestmark = pytest.mark.timeout(
    400
)  # a test boots once or twice; each QEMU run has its own timeout

FORMATS = ["raw", "qed"]
QED_F_NEED_CHECK = 0x2  # QED header features bit 1
GUEST_PATTERN = (b"VBG-GUEST-PATTERN-0123456789abcdef\n" * (MiB // 35 + 1))[:MiB]


def sha(data):
    return hashlib.sha256(data).hexdigest()


def serve_and_boot(gdir, image, fmt, script, serve_args=(), queues=1, smp=1, on_line=None):
    sock = os.path.join(gdir, "vblock.sock")
    srv = harness.Serve(sock, image, "-f", fmt, *serve_args)
    try:
        m = harness.boot(
            sock,
            script,
            gdir,
            queues=queues,
            smp=smp,
            on_line=on_line and (lambda ln: on_line(ln, srv)),
        )
    finally:
        rc, log = srv.stop()
    m["_serve_rc"], m["_serve_log"] = rc, log
    m["_flushes"] = srv.flushes(log)
    return m


def assert_ran(m):
    assert m.get("done") == "1" and m.get("exit") == "0", (
        m["_console"][-3000:] + "\n--- serve:\n" + m["_serve_log"]
    )
    assert m["_serve_rc"] == 0, m["_serve_log"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_guest_reads_host_pattern_and_writes_with_odirect(gdir, fmt):
    img = make_disk(gdir, fmt)
    script = f"""
echo "VBG serial=$(cat /sys/block/vda/serial)"
echo "VBG hostpat=$(dd if=/dev/vda bs=65536 skip={HOST_PATTERN_OFFSET // 65536} count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
yes VBG-GUEST-PATTERN-0123456789abcdef | head -c 1048576 > /tmp/pat
dd if=/tmp/pat of=/dev/vda bs=65536 oflag=direct conv=fsync 2>/dev/null || exit 3
dd if=/dev/vda of=/tmp/back bs=65536 count=16 iflag=direct 2>/dev/null || exit 4
cmp -s /tmp/pat /tmp/back && echo "VBG readback=OK" || echo "VBG readback=MISMATCH"
"""
    m = serve_and_boot(gdir, img, fmt, script, serve_args=("--serial", "VBLOCK-GUEST-1", "--debug"))
    assert_ran(m)
    assert m["serial"] == "VBLOCK-GUEST-1"
    # q35: SeaBIOS drives the disk first (no EVENT_IDX), then Linux restarts it with EVENT_IDX
    ups = [
        int(f, 16) for f in re.findall(r"device up with features (0x[0-9a-f]+)", m["_serve_log"])
    ]
    assert len(ups) >= 2 and not ups[0] >> 29 & 1 and ups[-1] >> 29 & 1, m["_serve_log"]
    assert "ring 0 stopped at avail index" in m["_serve_log"]
    assert m["hostpat"] == sha(HOST_PATTERN)
    assert m["readback"] == "OK"
    assert qemu_img_check(img, fmt)[0] == 0
    data = image_bytes(img, fmt)
    assert data[:MiB] == GUEST_PATTERN
    assert data[HOST_PATTERN_OFFSET : HOST_PATTERN_OFFSET + MiB] == HOST_PATTERN
    assert not os.path.exists(os.path.join(gdir, "vblock.sock"))  # removed on SIGTERM


@pytest.mark.parametrize("fmt,writeback", [("raw", "on"), ("qed", "on"), ("raw", "off")])
def test_guest_flushes_reach_the_backend(gdir, fmt, writeback):
    img = make_disk(gdir, fmt, host_pattern=False)
    script = """
echo "VBG cache=$(cat /sys/block/vda/queue/write_cache | tr ' ' _)"
head -c 1048576 /dev/urandom > /tmp/r
dd if=/tmp/r of=/dev/vda bs=65536 oflag=direct conv=fsync 2>/dev/null || exit 3
dd if=/tmp/r of=/dev/vda bs=65536 seek=32 oflag=direct conv=fsync 2>/dev/null || exit 3
echo "VBG sum=$(sha256sum /tmp/r | cut -c1-64)"
"""
    m = serve_and_boot(gdir, img, fmt, script, serve_args=("--writeback", writeback))
    assert_ran(m)
    data = image_bytes(img, fmt)
    assert sha(data[:MiB]) == m["sum"] and sha(data[2 * MiB : 3 * MiB]) == m["sum"]
    if writeback == "on":
        assert m["cache"] == "write_back"
        assert m["_flushes"] >= 2  # one per conv=fsync at least
    else:
        assert m["cache"] == "write_through"
        assert m["_flushes"] == 0


@pytest.mark.skipif(
    not (shutil.which("e2fsck") and shutil.which("debugfs")),
    reason="needs e2fsprogs (e2fsck, debugfs)",
)
@pytest.mark.parametrize("fmt", FORMATS)
def test_guest_ext2_file_system(gdir, fmt):
    img = make_disk(gdir, fmt, host_pattern=False)
    script = """
mke2fs -q /dev/vda >/dev/null 2>&1 || mke2fs /dev/vda || exit 3
mount -t ext2 /dev/vda /mnt || exit 4
mkdir /mnt/dir
head -c 300000 /dev/urandom > /mnt/f1
head -c 1200000 /dev/urandom > /mnt/f2
head -c 4096 /dev/urandom > /mnt/dir/f3
for f in f1 f2 dir/f3; do echo "VBG $(echo $f | tr / _)=$(sha256sum /mnt/$f | cut -c1-64)"; done
sync
umount /mnt || exit 5
"""
    m = serve_and_boot(gdir, img, fmt, script)
    assert_ran(m)
    rc, out = qemu_img_check(img, fmt)
    assert rc == 0, out
    raw = os.path.join(gdir, "fs.raw")
    with open(raw, "wb") as f:
        f.write(image_bytes(img, fmt))
    fsck = subprocess.run(["e2fsck", "-fn", raw], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    for name, key in (("/f1", "f1"), ("/f2", "f2"), ("/dir/f3", "dir_f3")):
        out = os.path.join(gdir, key + ".out")
        subprocess.run(
            ["debugfs", "-R", f"dump {name} {out}", raw], check=True, capture_output=True
        )
        with open(out, "rb") as f:
            assert sha(f.read()) == m[key], name


def _allocated(path):
    return os.stat(path).st_blocks * 512


@pytest.mark.parametrize("fmt", FORMATS)
def test_guest_blkdiscard_returns_host_space(gdir, fmt):
    img = make_disk(gdir, fmt, host_pattern=False)
    script = """
dd if=/dev/urandom of=/dev/vda bs=1048576 count=16 oflag=direct conv=fsync 2>/dev/null || exit 3
echo "VBG written=1"
blkdiscard -o 0 -l 12582912 /dev/vda || exit 4
sync
echo "VBG tail=$(dd if=/dev/vda bs=1048576 skip=12 count=4 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
"""
    before = []

    def on_line(line, srv):
        if "VBG written=1" in line:
            before.append(_allocated(img))
        return False

    m = serve_and_boot(gdir, img, fmt, script, on_line=on_line)
    assert_ran(m)
    assert before and before[0] >= 16 * MiB
    after = _allocated(img)
    assert after <= before[0] - 12 * MiB + MiB, (before, after)
    assert qemu_img_check(img, fmt)[0] == 0
    data = image_bytes(img, fmt)
    assert sha(data[12 * MiB : 16 * MiB]) == m["tail"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_guest_two_queues_parallel_writers(gdir, fmt):
    img = make_disk(gdir, fmt, host_pattern=False)
    script = """
echo "VBG hwq=$(ls /sys/block/vda/mq | wc -l)"
head -c 4194304 /dev/urandom > /tmp/a
head -c 4194304 /dev/urandom > /tmp/b
taskset 1 dd if=/tmp/a of=/dev/vda bs=65536 oflag=direct 2>/dev/null &
taskset 2 dd if=/tmp/b of=/dev/vda bs=65536 seek=128 oflag=direct 2>/dev/null &
wait
sync
echo "VBG a=$(sha256sum /tmp/a | cut -c1-64) b=$(sha256sum /tmp/b | cut -c1-64)"
echo "VBG ra=$(dd if=/dev/vda bs=65536 count=64 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
echo "VBG rb=$(dd if=/dev/vda bs=65536 skip=128 count=64 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
"""
    m = serve_and_boot(gdir, img, fmt, script, serve_args=("--queues", "2"), queues=2, smp=2)
    assert_ran(m)
    assert m["hwq"] == "2"
    kicks = re.search(r"kicks per queue (\d+)/(\d+)", m["_serve_log"])
    assert kicks and int(kicks.group(1)) > 0 and int(kicks.group(2)) > 0, m[
        "_serve_log"
    ]  # both rings worked
    assert m["ra"] == m["a"] and m["rb"] == m["b"]
    assert qemu_img_check(img, fmt)[0] == 0
    data = image_bytes(img, fmt)
    assert sha(data[: 4 * MiB]) == m["a"] and sha(data[8 * MiB : 12 * MiB]) == m["b"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_backend_sigkill_during_writes_keeps_flushed_data(gdir, fmt):
    img = make_disk(gdir, fmt, host_pattern=False)
    script = """
head -c 2097152 /dev/urandom > /tmp/a
dd if=/tmp/a of=/dev/vda bs=65536 oflag=direct conv=fsync 2>/dev/null || exit 3
echo "VBG a=$(sha256sum /tmp/a | cut -c1-64)"
i=0
while [ $i -lt 200 ]; do
  dd if=/dev/urandom of=/dev/vda bs=65536 count=16 seek=$((64 + i * 16)) oflag=direct 2>/dev/null
  [ $i = 2 ] && echo "VBG writing=1"
  i=$((i+1))
done
"""
    killed = []

    def on_line(line, srv):
        if "VBG writing=1" in line:
            srv.proc.send_signal(signal.SIGKILL)  # while the guest keeps writing
            srv.proc.wait()
            killed.append(True)
            return True  # and the VM goes too
        return False

    m = serve_and_boot(gdir, img, fmt, script, on_line=on_line)
    assert killed, m["_console"][-3000:]
    assert m["_serve_rc"] == -signal.SIGKILL
    flushed = m["a"]
    if fmt == "qed":  # the killed server left allocating writes behind: the image is marked dirty
        with open(img, "rb") as f:
            header = f.read(24)
        assert int.from_bytes(header[16:24], "little") & QED_F_NEED_CHECK
    # restart: opening the image repairs it (QED: need-check set by the killed server)
    check = """
echo "VBG ra=$(dd if=/dev/vda bs=65536 count=32 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
"""
    m2 = serve_and_boot(gdir, img, fmt, check)
    assert_ran(m2)
    assert m2["ra"] == flushed
    rc, out = qemu_img_check(img, fmt)
    assert rc == 0, out
    assert sha(image_bytes(img, fmt)[: 2 * MiB]) == flushed


def test_guest_sees_a_read_only_disk(gdir):
    img = make_disk(gdir, "raw")
    script = f"""
echo "VBG ro=$(blockdev --getro /dev/vda)"
dd if=/dev/zero of=/dev/vda bs=4096 count=1 oflag=direct 2>/dev/null && echo "VBG write=ok" || echo "VBG write=refused"
echo "VBG hostpat=$(dd if=/dev/vda bs=65536 skip={HOST_PATTERN_OFFSET // 65536} count=16 iflag=direct 2>/dev/null | sha256sum | cut -c1-64)"
"""
    m = serve_and_boot(gdir, img, "raw", script, serve_args=("--read-only",))
    assert_ran(m)
    assert m["ro"] == "1" and m["write"] == "refused"
    assert m["hostpat"] == sha(HOST_PATTERN)
    assert image_bytes(img, "raw")[:4096] == bytes(4096)


def test_benchmark_script_times_with_the_kernels_nanosecond_clock(gdir):
    """``vblock bench guest`` times its dd phases in the guest: with the kernel's ns clock, not
    /proc/uptime's 10 ms steps (2-3 % of a phase)."""
    from vblock.bench import guest as bench

    img = make_disk(gdir, "raw", host_pattern=False)
    m = serve_and_boot(gdir, img, "raw", bench.BENCH_SCRIPT % {"mib": 2, "bs": 65536})
    assert_ran(m)
    stamps = [m[k] for k in ("t0", "t1", "t2")]
    assert all(s.isdigit() for s in stamps), stamps  # nanoseconds, no "u" fallback
    t0, t1, t2 = (bench._seconds(s) for s in stamps)
    assert 0 < t1 - t0 < 60 and 0 < t2 - t1 < 60
    assert bench._seconds("u12.34") == 12.34

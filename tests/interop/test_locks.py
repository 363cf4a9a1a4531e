"""Image locks against real QEMU processes, both ways: while ``qemu-io`` or ``qemu-nbd`` holds an
image, vblock's opens and verbs are refused or allowed as QEMU's own would be; while vblock holds
one, ``qemu-io``, ``qemu-img`` and ``qemu-nbd`` are refused. Every refusal leaves the file's bytes
unchanged. Each peer is waited for by reading its output (qemu-io's prompt, vblock serve's
"on SOCKET" line) or by its own ready signal (``qemu-nbd --fork`` returns once it serves), never
by sleeping. Skipped, with the reason, where a QEMU tool is missing."""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys

import pytest

import vblock
from tests.files import digest
from vblock.errors import ImageLockedError

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
QEMU_NBD = shutil.which("qemu-nbd")
pytestmark = pytest.mark.interop
needs_qemu_io = pytest.mark.skipif(
    QEMU_IO is None, reason="qemu-io not installed (apt install qemu-utils)"
)
needs_qemu_img = pytest.mark.skipif(
    QEMU_IMG is None, reason="qemu-img not installed (apt install qemu-utils)"
)
needs_qemu_nbd = pytest.mark.skipif(
    QEMU_NBD is None, reason="qemu-nbd not installed (apt install qemu-utils)"
)

SIZE = 1 << 20
PROMPT = b"qemu-io> "
HELD_BY_ANOTHER = "another process (or another open in this one) is using the image"


@pytest.fixture
def raw(scratch):
    path = scratch / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return str(path)


@pytest.fixture
def qed(scratch):
    path = str(scratch / "disk.qed")
    vblock.create_image(path, "qed", SIZE).close()
    return path


def _read_until(stream, marker: bytes) -> bytes:
    """Read a pipe until ``marker`` shows up or the writer closes it (the peer exited)."""
    out = b""
    fd = stream.fileno()
    while marker not in out:
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        out += chunk
    return out


class QemuIo:
    """``qemu-io ARGS PATH`` running interactively, holding the image until ``close``."""

    def __init__(self, path, *args):
        self.proc = subprocess.Popen(
            [QEMU_IO, *args, path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.output = _read_until(self.proc.stdout, PROMPT)
        if PROMPT not in self.output:
            self.close()
            raise AssertionError(
                f"qemu-io did not open {path}: {self.output.decode(errors='replace')}"
            )

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(b"quit\n")
            self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.proc.stdout.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class QemuNbd:
    """``qemu-nbd --fork`` serving PATH: it returns once the image is open and served (or failed)."""

    def __init__(self, path, tmpdir, *args):
        self.pid_file = os.path.join(tmpdir, "nbd.pid")
        sock = os.path.join(tmpdir, "nbd.sock")
        r = subprocess.run(
            [QEMU_NBD, "--fork", f"--pid-file={self.pid_file}", f"--socket={sock}", *args, path],
            capture_output=True,
            text=True,
            timeout=60,
        )
        self.returncode, self.stderr = r.returncode, r.stderr
        self.pid = None
        if r.returncode == 0:
            with open(self.pid_file) as f:
                self.pid = int(f.read())

    def close(self):
        if self.pid is None:
            return
        pidfd = os.pidfd_open(self.pid)  # the daemon is not our child: wait on its pidfd
        try:
            os.kill(self.pid, signal.SIGTERM)
            ready, _, _ = select.select([pidfd], [], [], 60)
            assert ready, "qemu-nbd did not exit on SIGTERM"
        finally:
            os.close(pidfd)
        self.pid = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def qemu(*args):
    return subprocess.run(args, capture_output=True, text=True, timeout=60)


def vblock_cmd(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "vblock", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- QEMU holds, vblock asks ------------------------------------------------------------------------


@needs_qemu_io
def test_vblock_read_write_refused_while_qemu_io_writes(raw):
    before = digest(raw)
    with QemuIo(raw, "-f", "raw"):
        with pytest.raises(ImageLockedError) as info:
            vblock.open_image(raw, format="raw", cache="writeback")
    assert str(info.value) == f'{raw}: failed to get shared "write" lock: {HELD_BY_ANOTHER}'
    assert digest(raw) == before


@needs_qemu_io
def test_vblock_read_only_refused_while_qemu_io_writes(raw):
    with QemuIo(raw, "-f", "raw"):
        with pytest.raises(ImageLockedError, match='shared "write"'):
            vblock.open_image(raw, format="raw", read_only=True)


@needs_qemu_io
def test_vblock_force_share_reads_while_qemu_io_writes(raw):
    with open(raw, "rb") as f:
        head = f.read(512)
    with QemuIo(raw, "-f", "raw"):
        with vblock.open_image(raw, format="raw", read_only=True, force_share=True) as img:
            assert img.read(0, 512) == head


@needs_qemu_io
def test_vblock_read_write_allowed_beside_qemu_io_read_only(raw):
    # qemu-io -r shares everything, so QEMU itself would let a writer in too.
    with QemuIo(raw, "-r", "-f", "raw"):
        vblock.open_image(raw, format="raw", cache="writeback").close()


@needs_qemu_io
def test_vblock_info_refused_while_qemu_io_writes(raw):
    with QemuIo(raw, "-f", "raw"):
        r = vblock_cmd("info", "-f", "raw", raw)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        f'vblock: error: {raw}: failed to get shared "write" lock: {HELD_BY_ANOTHER}'
    ]


@needs_qemu_io
def test_vblock_info_force_share_works_while_qemu_io_writes(raw):
    with QemuIo(raw, "-f", "raw"):
        r = vblock_cmd("info", "-U", "-f", "raw", raw)
    assert r.returncode == 0, r.stderr
    assert "virtual size: 1 MiB" in r.stdout


@needs_qemu_io
def test_vblock_resize_refused_while_qemu_io_writes(raw):
    before = digest(raw)
    with QemuIo(raw, "-f", "raw"):
        r = vblock_cmd("resize", "-f", "raw", raw, "2M")
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    assert 'failed to get shared "write" lock' in r.stderr
    assert os.path.getsize(raw) == SIZE and digest(raw) == before


@needs_qemu_io
def test_vblock_check_repair_refused_while_qemu_io_writes(qed):
    before = digest(qed)
    with QemuIo(qed, "-f", "qed"):
        r = vblock_cmd("check", "-r", "all", qed)
    assert r.returncode == 1 and len(r.stderr.splitlines()) == 1
    # qemu-io's QED node does not share write on its file (its metadata must stay consistent)
    assert 'failed to get "write" lock' in r.stderr
    assert digest(qed) == before


@needs_qemu_nbd
def test_vblock_read_only_works_beside_qemu_nbd_read_only(raw, scratch):
    with QemuNbd(raw, str(scratch), "-r", "-f", "raw") as nbd:
        assert nbd.returncode == 0, nbd.stderr
        vblock.open_image(raw, format="raw", read_only=True).close()


@needs_qemu_nbd
def test_vblock_read_write_refused_beside_qemu_nbd_read_only(raw, scratch):
    before = digest(raw)
    with QemuNbd(raw, str(scratch), "-r", "-f", "raw") as nbd:
        assert nbd.returncode == 0, nbd.stderr
        with pytest.raises(ImageLockedError) as info:
            vblock.open_image(raw, format="raw", cache="writeback")
    assert str(info.value) == f'{raw}: failed to get "resize" lock: {HELD_BY_ANOTHER}'
    assert digest(raw) == before


@needs_qemu_nbd
def test_vblock_read_only_refused_beside_qemu_nbd_read_write(raw, scratch):
    with QemuNbd(raw, str(scratch), "-f", "raw") as nbd:
        assert nbd.returncode == 0, nbd.stderr
        with pytest.raises(ImageLockedError, match='shared "write"'):
            vblock.open_image(raw, format="raw", read_only=True)


# -- vblock holds, QEMU asks ------------------------------------------------------------------------


@needs_qemu_io
def test_qemu_io_write_refused_while_vblock_writes(raw):
    before = digest(raw)
    with vblock.open_image(raw, format="raw", cache="writeback"):
        r = qemu(QEMU_IO, "-f", "raw", "-c", "write -P 0x5a 0 512", raw)
    assert r.returncode == 1
    assert 'Failed to get "write" lock' in r.stderr
    assert digest(raw) == before


@needs_qemu_io
def test_qemu_io_write_refused_while_vblock_reads(raw):
    before = digest(raw)
    with vblock.open_image(raw, format="raw", read_only=True):
        r = qemu(QEMU_IO, "-f", "raw", "-c", "write -P 0x5a 0 512", raw)
    assert r.returncode == 1
    assert 'Failed to get "write" lock' in r.stderr
    assert digest(raw) == before


@needs_qemu_io
def test_qemu_io_write_allowed_beside_vblock_force_share(raw):
    with vblock.open_image(raw, format="raw", read_only=True, force_share=True):
        r = qemu(QEMU_IO, "-f", "raw", "-c", "write -P 0x5a 0 512", raw)
    assert r.returncode == 0, r.stderr
    with open(raw, "rb") as f:
        assert f.read(512) == b"\x5a" * 512


@needs_qemu_img
def test_qemu_img_info_refused_while_vblock_writes(qed):
    # For a format image QEMU's file node shares neither write nor resize, so info conflicts.
    # (A raw image opened by qemu-img info shares everything, and QEMU lets that through.)
    with vblock.open_image(qed, cache="writeback"):
        r = qemu(QEMU_IMG, "info", qed)
    assert r.returncode == 1
    assert 'Failed to get shared "write" lock' in r.stderr


@needs_qemu_img
def test_qemu_img_info_force_share_works_while_vblock_writes(qed):
    with vblock.open_image(qed, cache="writeback"):
        r = qemu(QEMU_IMG, "info", "-U", qed)
    assert r.returncode == 0, r.stderr
    assert "file format: qed" in r.stdout


@needs_qemu_img
def test_qemu_img_resize_refused_while_vblock_reads(raw):
    with vblock.open_image(raw, format="raw", read_only=True):
        r = qemu(QEMU_IMG, "resize", "-f", "raw", raw, "2M")
    assert r.returncode == 1
    assert 'Failed to get "write" lock' in r.stderr
    assert os.path.getsize(raw) == SIZE


@needs_qemu_nbd
def test_qemu_nbd_refused_while_vblock_writes(raw, scratch):
    with vblock.open_image(raw, format="raw", cache="writeback"):
        with QemuNbd(raw, str(scratch), "-f", "raw") as nbd:
            assert nbd.returncode == 1
            assert 'Failed to get "write" lock' in nbd.stderr


@needs_qemu_nbd
def test_qemu_nbd_read_only_refused_while_vblock_writes(raw, scratch):
    with vblock.open_image(raw, format="raw", cache="writeback"):
        with QemuNbd(raw, str(scratch), "-r", "-f", "raw") as nbd:
            assert nbd.returncode == 1
            assert 'Failed to get shared "resize" lock' in nbd.stderr


# -- vblock serve -----------------------------------------------------------------------------------


class Serve:
    """``vblock serve`` on an image, until ``close`` (SIGTERM); ready once it says "on SOCKET"."""

    def __init__(self, image, sock):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vblock", "serve", "--vhost-user", sock, "-f", "raw", image],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.said = _read_until(self.proc.stderr, f" on {sock}\n".encode())
        if f" on {sock}\n".encode() not in self.said:
            self.close()
            raise AssertionError(
                f"vblock serve did not start: {self.said.decode(errors='replace')}"
            )

    def close(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)
        self.proc.stderr.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_serve_holds_its_image_locked(raw, scratch):
    before = digest(raw)
    with Serve(raw, str(scratch / "one.sock")):
        with pytest.raises(ImageLockedError, match='failed to get shared "write" lock'):
            vblock.open_image(raw, format="raw", read_only=True)
        second = vblock_cmd("serve", "--vhost-user", scratch / "two.sock", "-f", "raw", raw)
        assert second.returncode == 1
        assert second.stderr.splitlines() == [
            f'vblock: error: {raw}: failed to get "write" lock: {HELD_BY_ANOTHER}'
        ]
        assert not (scratch / "two.sock").exists()
        if QEMU_IO is not None:
            r = qemu(QEMU_IO, "-f", "raw", "-c", "write -P 0x5a 0 512", raw)
            assert r.returncode == 1 and 'Failed to get "write" lock' in r.stderr
    assert digest(raw) == before
    vblock.open_image(raw, format="raw", cache="writeback").close()  # released at exit

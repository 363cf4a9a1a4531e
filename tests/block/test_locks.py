"""Image locks taken by ``vblock.open_image`` / ``create_image``: which bytes each kind of open
holds (read back with F_OFD_GETLK from a descriptor of the test's own), which opens exclude each
other, and the ``force_share`` / ``locking`` options. Exclusion against real QEMU processes is in
tests/interop/test_locks_qemu.py."""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import shutil
import struct
import subprocess

import pytest

import vblock
from tests.files import digest
from vblock.errors import ImageError, ImageLockedError, UnknownOptionError
from vblock.hostio import lock as lockmod

SIZE = 1 << 20
RW_BYTES = {100, 101, 103, 201, 203}  # consistent read, write, resize used; write, resize unshared
RO_BYTES = {100, 201, 203}  # consistent read used; write, resize unshared
SHARE_BYTES = {100}  # consistent read used; everything shared
_FLOCK = struct.Struct("hhqqi4x")


def locked_bytes(path) -> dict:
    """{byte: l_pid} for every QEMU lock byte (100-103, 200-203) that another open holds."""
    fd = os.open(path, os.O_RDONLY)
    try:
        out = {}
        for byte in (*range(100, 104), *range(200, 204)):
            got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, byte, 1, 0))
            l_type, _, _, _, pid = _FLOCK.unpack(got)
            if l_type != fcntl.F_UNLCK:
                out[byte] = pid
        return out
    finally:
        os.close(fd)


@pytest.fixture
def raw(scratch):
    path = scratch / "disk.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return str(path)


def open_raw(path, mode, **kw):
    """mode: "rw", "ro" or "ro-U" (read-only with force_share)."""
    return vblock.open_image(
        path,
        format="raw",
        cache="writeback",
        read_only=mode != "rw",
        force_share=mode == "ro-U",
        **kw,
    )


# -- bytes held by each kind of open ----------------------------------------------------------------


def test_read_write_open_holds_qemu_rw_bytes(raw):
    with open_raw(raw, "rw"):
        held = locked_bytes(raw)
    assert set(held) == RW_BYTES
    assert set(held.values()) == {-1}  # OFD locks: owned by an open, not a process


def test_read_only_open_holds_qemu_ro_bytes(raw):
    with open_raw(raw, "ro"):
        assert set(locked_bytes(raw)) == RO_BYTES


def test_force_share_open_holds_only_the_consistent_read_byte(raw):
    with open_raw(raw, "ro-U"):
        assert set(locked_bytes(raw)) == SHARE_BYTES


def test_lock_bytes_appear_in_proc_locks_as_ofd_read_locks(raw):
    ino = os.stat(raw).st_ino
    with open_raw(raw, "rw"):
        with open("/proc/locks") as f:
            mine = [line.split() for line in f if f":{ino} " in line]
    # "1: OFDLCK ADVISORY READ -1 <dev>:<inode> 100 101" (adjacent bytes of one open are merged)
    assert {b for p in mine for b in range(int(p[-2]), int(p[-1]) + 1)} == RW_BYTES
    assert {(p[1], p[3]) for p in mine} == {("OFDLCK", "READ")}


def test_locks_are_dropped_at_close(raw):
    img = open_raw(raw, "rw")
    img.close()
    assert locked_bytes(raw) == {}


def test_locks_are_dropped_when_the_open_fails(scratch):
    path = str(scratch / "bad.qed")
    with open(path, "wb") as f:
        f.write(b"QED\0" + b"\xff" * 4092)  # the magic, then a header no check accepts
    with pytest.raises(ImageError):
        vblock.open_image(path, format="qed")
    assert locked_bytes(path) == {}


def test_memory_and_null_images_take_no_locks():
    with (
        vblock.open_image(None, format="memory", size=SIZE) as m,
        vblock.open_image(None, format="null", size=SIZE) as n,
    ):
        assert m.lock is None and n.lock is None


# -- which opens exclude each other -------------------------------------------------------------------

# (first open, second open, whether the second is refused), QEMU's rules for these permissions
PAIRS = [
    ("rw", "rw", True),
    ("rw", "ro", True),
    ("rw", "ro-U", False),
    ("ro", "rw", True),
    ("ro", "ro", False),
    ("ro", "ro-U", False),
    ("ro-U", "rw", False),
    ("ro-U", "ro", False),
    ("ro-U", "ro-U", False),
]


@pytest.mark.parametrize("first,second,refused", PAIRS, ids=[f"{a}-then-{b}" for a, b, _ in PAIRS])
def test_second_open_in_this_process(raw, first, second, refused):
    before = digest(raw)
    with open_raw(raw, first):
        held = locked_bytes(raw)
        if refused:
            with pytest.raises(ImageLockedError):
                open_raw(raw, second)
            assert locked_bytes(raw) == held  # the refused open left nothing behind
        else:
            open_raw(raw, second).close()
    assert digest(raw) == before


def test_second_read_write_open_names_the_lock_and_the_holder(raw):
    with open_raw(raw, "rw"):
        with pytest.raises(ImageLockedError) as info:
            open_raw(raw, "rw")
    assert str(info.value) == (
        f'{raw}: failed to get "write" lock: another process (or another '
        f"open in this one) is using the image"
    )
    assert info.value.lock == '"write"' and info.value.path == raw and info.value.pid == -1


def test_read_only_open_while_written_names_the_shared_lock(raw):
    with open_raw(raw, "rw"):
        with pytest.raises(ImageLockedError) as info:
            open_raw(raw, "ro")
    assert info.value.lock == 'shared "write"'
    assert 'failed to get shared "write" lock' in str(info.value)


def test_classic_lock_holder_is_named_by_pid(raw):
    # A classic (process-owned) write lock on byte 201, as a non-QEMU tool might take.
    with open(raw, "r+b") as f:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 201)
        with pytest.raises(ImageLockedError) as info:
            open_raw(raw, "ro")
    assert info.value.pid == os.getpid()
    assert str(info.value) == (
        f"{raw}: failed to lock byte 201: process {os.getpid()} holds a "
        f"conflicting lock on the image"
    )


def test_force_share_with_read_write_is_a_value_error(raw):
    before = digest(raw)
    with pytest.raises(ValueError, match="force_share=True needs read_only=True"):
        vblock.open_image(raw, format="raw", force_share=True)
    assert locked_bytes(raw) == {} and digest(raw) == before


def test_create_image_with_force_share_is_a_value_error(scratch):
    path = scratch / "new.raw"
    with pytest.raises(ValueError, match="force_share"):
        vblock.create_image(path, "raw", SIZE, force_share=True)
    assert not path.exists()


def test_unknown_locking_mode_is_refused(raw):
    with pytest.raises(UnknownOptionError) as info:
        open_raw(raw, "rw", locking="maybe")
    assert info.value.option == "locking"


# -- locking="off" / "on" / "auto" --------------------------------------------------------------------


def test_locking_off_takes_no_locks(raw):
    with open_raw(raw, "rw", locking="off") as img:
        assert img.lock is None
        assert locked_bytes(raw) == {}


def test_locking_off_ignores_locks_held_by_others(raw):
    with open_raw(raw, "rw"):
        open_raw(raw, "rw", locking="off").close()


def _no_ofd_locks(monkeypatch):
    """The host's fcntl as on a file system without OFD byte-range locks."""

    def refuse(fd, cmd, arg):
        raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

    monkeypatch.setattr(lockmod, "_fcntl", refuse)


def test_locking_on_fails_without_ofd_locks(raw, monkeypatch):
    _no_ofd_locks(monkeypatch)
    with pytest.raises(OSError) as info:
        open_raw(raw, "rw", locking="on")
    assert info.value.errno == errno.EOPNOTSUPP
    assert info.value.filename == raw
    assert "no OFD locks" in str(info.value)


def test_locking_auto_opens_without_ofd_locks(raw, monkeypatch):
    _no_ofd_locks(monkeypatch)
    with open_raw(raw, "rw") as img:  # locking="auto" is the default
        assert img.read(0, 512) == pathlib.Path(raw).read_bytes()[:512]
        assert img.lock is not None and not img.lock.active


def test_locking_auto_still_reports_a_real_host_failure(raw, monkeypatch):
    def fail(fd, cmd, arg):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(lockmod, "_fcntl", fail)
    with pytest.raises(OSError) as info:
        open_raw(raw, "rw")
    assert info.value.errno == errno.EIO


# -- backing files and creation -----------------------------------------------------------------------


@pytest.fixture
def overlay(scratch, raw):
    path = str(scratch / "top.qed")
    vblock.create_image(path, "qed", SIZE, backing_file=raw, backing_fmt="raw").close()
    return path


def test_backing_file_is_locked_as_a_read_only_open(overlay, raw):
    with vblock.open_image(overlay, cache="writeback"):
        assert set(locked_bytes(overlay)) == RW_BYTES
        assert set(locked_bytes(raw)) == RO_BYTES
    assert locked_bytes(overlay) == {} and locked_bytes(raw) == {}


def test_two_overlays_share_one_backing_file(scratch, raw, overlay):
    other = str(scratch / "other.qed")
    vblock.create_image(other, "qed", SIZE, backing_file=raw, backing_fmt="raw").close()
    with vblock.open_image(overlay, cache="writeback"), vblock.open_image(other, cache="writeback"):
        assert set(locked_bytes(raw)) == RO_BYTES


def test_backing_file_in_use_refuses_a_writer(raw, overlay):
    before = digest(raw)
    with vblock.open_image(overlay, cache="writeback"):
        with pytest.raises(ImageLockedError, match='failed to get "write" lock'):
            open_raw(raw, "rw")
    assert digest(raw) == before


def test_overlay_refused_while_its_backing_file_is_written(raw, overlay):
    before = digest(overlay)
    with open_raw(raw, "rw"):
        with pytest.raises(ImageLockedError, match='shared "write"'):
            vblock.open_image(overlay, cache="writeback")
        assert set(locked_bytes(overlay)) == set()  # the top's locks went with the failed open
    assert digest(overlay) == before


def test_force_share_reaches_the_backing_file(raw, overlay):
    with open_raw(raw, "rw"):
        with vblock.open_image(overlay, read_only=True, force_share=True) as img:
            assert img.backing.options.force_share


def test_create_image_refuses_a_file_in_use(raw):
    before = digest(raw)
    with open_raw(raw, "ro"):
        with pytest.raises(ImageLockedError, match='failed to get "write" lock'):
            vblock.create_image(raw, "raw", SIZE)
    assert digest(raw) == before


def test_create_image_holds_the_new_image_open_with_rw_locks(scratch):
    path = str(scratch / "made.raw")
    with vblock.create_image(path, "raw", SIZE):
        assert set(locked_bytes(path)) == RW_BYTES


# -- devices ----------------------------------------------------------------------------------------


@pytest.fixture
def loop_device(raw):
    if shutil.which("losetup") is None or os.geteuid() != 0:
        pytest.skip("needs losetup and root for a loop device")
    r = subprocess.run(["losetup", "--find", "--show", raw], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=True)


def test_block_device_open_takes_locks(loop_device):
    with vblock.open_image(loop_device, format="raw", cache="writeback"):
        assert set(locked_bytes(loop_device)) == RW_BYTES
        with pytest.raises(ImageLockedError):
            vblock.open_image(loop_device, format="raw", read_only=True)
    assert locked_bytes(loop_device) == {}

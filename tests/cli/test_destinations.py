"""Where ``create`` and ``convert`` write, as qemu-img does: devices in place (never replaced),
symlinks followed, an existing file's mode and owner kept, ``convert -n`` into an existing image,
and messages that name the file the user gave, never the temporary one."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess

import pytest

import vblock
from tests.cli.clitools import run_cli
from tests.files import digest

MiB = 1 << 20


def one_error_line(r, *fragments):
    assert r.rc == 1, (r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("vblock: error: ") and "Traceback" not in r.err
    for f in fragments:
        assert f in line, line
    assert ".vblock-" not in line  # never the temporary name
    return line


def digest_n(path, n) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read(n)).hexdigest()


def raw_source(path, size=2 * MiB, hole=(MiB, MiB // 2), zeros=(MiB // 4, 64 << 10)):
    """A raw file of random bytes with a hole at ``hole`` (never written: it reads as zeros) and
    zeros written at ``zeros`` (offset, length each); returns what it reads as."""
    data = bytearray(os.urandom(size))
    for off, n in (hole, zeros):
        data[off : off + n] = bytes(n)
    with open(path, "wb") as f:
        f.write(data[: hole[0]])
        f.seek(hole[0] + hole[1])
        f.write(data[hole[0] + hole[1] :])
    return bytes(data)


@pytest.fixture
def loop_device(tmp_path):
    """A 4 MiB loop device full of random bytes, over a file in tmp_path; detached afterwards."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("loop devices need root and losetup")
    backing = tmp_path / "loop.img"
    backing.write_bytes(os.urandom(4 * MiB))
    p = subprocess.run(["losetup", "-f", "--show", str(backing)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"no loop device on this machine: {p.stderr.strip()}")
    dev = p.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True)


def node_of(path):
    st = os.lstat(path)
    return stat.S_IFMT(st.st_mode), st.st_rdev, st.st_ino


# -- devices --------------------------------------------------------------------------------------
def test_convert_to_a_loop_device_writes_it_in_place_zeros_included(scratch, loop_device):
    data = raw_source(scratch / "src.raw")
    before = node_of(loop_device)
    r = run_cli("convert", "-f", "raw", "-O", "raw", scratch / "src.raw", loop_device)
    assert r.rc == 0, r.err
    assert node_of(loop_device) == before and stat.S_ISBLK(before[0])
    with open(loop_device, "rb") as f:
        assert f.read(len(data)) == data  # the hole's zeros were written over the random bytes
    assert not [n for n in os.listdir("/dev") if ".vblock-" in n]  # no temporary file beside it


def test_create_raw_on_a_loop_device_keeps_the_node_and_its_bytes(loop_device):
    before, content = node_of(loop_device), digest(loop_device)
    r = run_cli("create", "-f", "raw", loop_device, "2M")
    assert r.rc == 0, r.err
    assert node_of(loop_device) == before and digest(loop_device) == content


def test_create_on_a_too_small_device_is_refused(loop_device):
    content = digest(loop_device)
    r = run_cli("create", "-f", "raw", loop_device, "8M")
    one_error_line(r, loop_device, "holds 4194304 bytes", "8388608")
    assert stat.S_ISBLK(os.lstat(loop_device).st_mode) and digest(loop_device) == content


def test_convert_to_a_too_small_device_is_refused(scratch, loop_device):
    raw_source(scratch / "big.raw", size=6 * MiB)
    content = digest(loop_device)
    r = run_cli("convert", "-f", "raw", "-O", "raw", scratch / "big.raw", loop_device)
    one_error_line(r, loop_device, "holds 4194304 bytes")
    assert stat.S_ISBLK(os.lstat(loop_device).st_mode) and digest(loop_device) == content


def test_qed_on_a_device_is_refused_before_anything_is_written(scratch, loop_device):
    raw_source(scratch / "src.raw")
    content = digest(loop_device)
    r = run_cli("convert", "-f", "raw", "-O", "qed", scratch / "src.raw", loop_device)
    one_error_line(r, loop_device, "a QED image cannot be made on a device")
    r = run_cli("create", "-f", "qed", loop_device, "1M")
    one_error_line(r, loop_device, "a QED image cannot be made on a device")
    assert stat.S_ISBLK(os.lstat(loop_device).st_mode) and digest(loop_device) == content


@pytest.fixture
def char_device(tmp_path):
    """A character device node in tmp_path (the null device's numbers): it reports size 0."""
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    node = tmp_path / "null-node"
    try:
        os.mknod(node, 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError as exc:
        pytest.skip(f"cannot make a device node here: {exc}")
    return node


def test_create_on_a_character_device_never_replaces_it(char_device):
    before = node_of(char_device)
    r = run_cli("create", "-f", "raw", char_device, "0")
    assert r.rc == 0, r.err
    assert node_of(char_device) == before and stat.S_ISCHR(before[0])
    r = run_cli("create", "-f", "raw", char_device, "1M")
    one_error_line(r, str(char_device), "holds 0 bytes")
    assert node_of(char_device) == before
    assert os.listdir(char_device.parent) == [char_device.name]


def test_convert_to_a_character_device_never_replaces_it(scratch, char_device):
    raw_source(scratch / "src.raw")
    before = node_of(char_device)
    r = run_cli("convert", "-f", "raw", "-O", "raw", scratch / "src.raw", char_device)
    one_error_line(r, str(char_device), "holds 0 bytes")
    assert node_of(char_device) == before
    assert os.listdir(char_device.parent) == [char_device.name]


# -- symlinks -------------------------------------------------------------------------------------
def test_convert_through_a_symlink_keeps_the_link_and_writes_its_target(scratch):
    data = raw_source(scratch / "src.raw")
    target = scratch / "target.raw"
    target.write_bytes(b"old" * 1000)
    (scratch / "link.raw").symlink_to("target.raw")
    r = run_cli("convert", "-f", "raw", "-O", "raw", scratch / "src.raw", scratch / "link.raw")
    assert r.rc == 0, r.err
    assert os.readlink(scratch / "link.raw") == "target.raw"
    assert target.read_bytes() == data
    assert sorted(os.listdir(scratch)) == ["link.raw", "src.raw", "target.raw"]


def test_create_through_a_dangling_symlink_makes_its_target(scratch):
    (scratch / "sub").mkdir()
    (scratch / "link.qed").symlink_to("sub/new.qed")
    r = run_cli("create", "-f", "qed", scratch / "link.qed", "1M")
    assert r.rc == 0, r.err
    assert os.path.islink(scratch / "link.qed")
    with vblock.open_image(str(scratch / "sub" / "new.qed"), read_only=True) as img:
        assert (img.format, img.size) == ("qed", MiB)
    assert os.listdir(scratch / "sub") == ["new.qed"]


# -- an existing file keeps its mode and owner --------------------------------------------------
def _own(path, mode, uid):
    os.chmod(path, mode)
    os.chown(path, uid, uid)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
def test_create_keeps_the_mode_and_owner_of_the_file_it_replaces(scratch):
    p = scratch / "kept.qed"
    p.write_bytes(b"x" * 4096)
    _own(p, 0o600, 12345)
    r = run_cli("create", "-f", "qed", p, "1M")
    assert r.rc == 0, r.err
    st = os.stat(p)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 12345, 12345)
    with vblock.open_image(str(p), read_only=True) as img:
        assert img.format == "qed"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another owner needs root")
def test_convert_keeps_the_mode_and_owner_of_the_file_it_replaces(scratch):
    data = raw_source(scratch / "src.raw")
    p = scratch / "kept.raw"
    p.write_bytes(b"x" * 4096)
    _own(p, 0o640, 12345)
    r = run_cli("convert", "-f", "raw", "-O", "raw", scratch / "src.raw", p)
    assert r.rc == 0, r.err
    st = os.stat(p)
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o640, 12345, 12345)
    assert p.read_bytes() == data


@pytest.mark.parametrize("verb", ["create", "convert"])
def test_a_destination_another_open_is_writing_is_refused_and_left_alone(scratch, verb):
    raw_source(scratch / "src.raw")
    p = scratch / "busy.raw"
    p.write_bytes(os.urandom(2 * MiB))
    before = digest(p)
    ino = os.stat(p).st_ino
    with vblock.open_image(p, format="raw", cache="writeback"):  # a writer, as a VM would be
        if verb == "create":
            r = run_cli("create", "-f", "raw", p, "2M")
        else:
            r = run_cli("convert", "-f", "raw", "-O", "raw", scratch / "src.raw", p)
        one_error_line(r, str(p), '"write" lock')
    assert os.stat(p).st_ino == ino and digest(p) == before
    assert not [n for n in os.listdir(scratch) if ".vblock-" in n]  # no temporary file left


# -- convert -n -----------------------------------------------------------------------------------
def test_convert_n_writes_into_an_existing_raw_file_in_place(scratch):
    data = raw_source(scratch / "src.raw")
    dst = scratch / "dst.raw"
    rest = os.urandom(MiB)
    dst.write_bytes(os.urandom(len(data)) + rest)
    _own(dst, 0o604, os.getuid())
    ino = os.stat(dst).st_ino
    r = run_cli("convert", "-n", "-f", "raw", "-O", "raw", scratch / "src.raw", dst)
    assert r.rc == 0, r.err
    st = os.stat(dst)
    assert st.st_ino == ino and stat.S_IMODE(st.st_mode) == 0o604  # the same file, written in place
    assert dst.read_bytes() == data + rest  # zeros written over the old bytes, the tail untouched


def test_convert_n_writes_into_an_existing_qed_image(scratch):
    data = raw_source(scratch / "src.raw")
    dst = scratch / "dst.qed"
    with vblock.create_image(str(dst), "qed", 4 * MiB) as img:
        img.write(0, b"\xee" * (4 * MiB))
    r = run_cli("convert", "-n", "-f", "raw", "-O", "qed", scratch / "src.raw", dst)
    assert r.rc == 0, r.err
    with vblock.open_image(str(dst), read_only=True) as img:
        assert img.size == 4 * MiB
        assert img.read(0, len(data)) == data
        assert img.read(len(data), MiB) == b"\xee" * MiB


def test_convert_n_without_a_destination_creates_nothing(scratch):
    raw_source(scratch / "src.raw")
    r = run_cli(
        "convert", "-n", "-f", "raw", "-O", "raw", scratch / "src.raw", scratch / "none.raw"
    )
    one_error_line(r, "none.raw", "-n writes into an existing image")
    assert os.listdir(scratch) == ["src.raw"]


def test_convert_n_into_a_smaller_destination_changes_nothing(scratch):
    raw_source(scratch / "src.raw")
    dst = scratch / "small.raw"
    dst.write_bytes(os.urandom(MiB))
    before = digest(dst)
    r = run_cli("convert", "-n", "-f", "raw", "-O", "raw", scratch / "src.raw", dst)
    one_error_line(r, "small.raw", "is smaller (1048576 bytes) than the source (2097152 bytes)")
    assert digest(dst) == before and sorted(os.listdir(scratch)) == ["small.raw", "src.raw"]


@pytest.mark.parametrize("extra", [["-o", "preallocation=full"], ["-B", "base.raw", "-F", "raw"]])
def test_convert_n_refuses_creation_options(scratch, extra):
    raw_source(scratch / "src.raw")
    (scratch / "base.raw").write_bytes(bytes(MiB))
    dst = scratch / "dst.raw"
    dst.write_bytes(os.urandom(2 * MiB))
    before = digest(dst)
    r = run_cli("convert", "-n", *extra, "-f", "raw", "-O", "raw", scratch / "src.raw", dst)
    one_error_line(r, "-n writes into the existing image as it is")
    assert digest(dst) == before


def test_convert_n_into_a_loop_device(scratch, loop_device):
    data = raw_source(scratch / "src.raw")
    with open(loop_device, "rb") as f:
        f.seek(len(data))
        tail = f.read()
    r = run_cli("convert", "-n", "-f", "raw", "-O", "raw", scratch / "src.raw", loop_device)
    assert r.rc == 0, r.err
    with open(loop_device, "rb") as f:
        assert f.read() == data + tail


# -- messages name the user's path --------------------------------------------------------------
def test_a_format_error_while_creating_names_the_given_file(scratch):
    r = run_cli("create", "-f", "qed", scratch / "huge.qed", "7E")
    one_error_line(r, f"{scratch / 'huge.qed'}: QED image size must be at most")
    assert os.listdir(scratch) == []


def test_a_host_error_while_creating_names_the_given_file(scratch, monkeypatch):
    def no_space(fd, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "ftruncate", no_space)
    r = run_cli("create", "-f", "raw", scratch / "full.raw", "1M")
    assert one_error_line(r) == f"vblock: error: {scratch / 'full.raw'}: No space left on device"
    assert os.listdir(scratch) == []


def test_an_error_through_a_symlink_names_the_link(scratch):
    (scratch / "link.qed").symlink_to("target.qed")
    r = run_cli("create", "-f", "qed", "-o", "cluster_size=3000", scratch / "link.qed", "1M")
    one_error_line(r, str(scratch / "link.qed"))
    assert os.listdir(scratch) == ["link.qed"]


def test_a_warning_while_creating_names_the_given_file(scratch):
    r = run_cli("create", "-f", "qed", "-o", "table_size=1", scratch / "t1.qed", "1M")
    assert r.rc == 0, r.err
    warnings = [ln for ln in r.err_lines if ln.startswith("vblock: warning: ")]
    assert warnings == [
        f"vblock: warning: {scratch / 't1.qed'}: QEMU cannot open QED images with table_size 1"
    ]


def test_a_fifo_destination_is_refused(scratch):
    os.mkfifo(scratch / "pipe")
    r = run_cli("create", "-f", "raw", scratch / "pipe", "1M")
    one_error_line(r, "pipe", "not a regular file or a device")
    assert stat.S_ISFIFO(os.lstat(scratch / "pipe").st_mode) and os.listdir(scratch) == ["pipe"]

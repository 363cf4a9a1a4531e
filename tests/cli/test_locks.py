"""The verbs and image locks: a verb on an image another open holds is one error line and exit 1
(the file unchanged); ``-U/--force-share`` lets the read-only verbs look anyway, as qemu-img's
does. The holder here is an open in this process, which conflicts exactly as another process
would (OFD locks belong to opens); tests/interop/test_locks_qemu.py holds images with QEMU."""

from __future__ import annotations

import os
import pathlib

import pytest

import vblock
from tests.cli.clitools import run_cli
from tests.files import digest

SIZE = 1 << 20
HELD = "another process (or another open in this one) is using the image"


@pytest.fixture
def raw(scratch):
    path = scratch / "disk.raw"
    path.write_bytes(os.urandom(SIZE))
    return str(path)


@pytest.fixture
def qed(scratch):
    path = str(scratch / "disk.qed")
    with vblock.create_image(path, "qed", SIZE) as img:
        img.write(0, b"\x11" * 65536)
    return path


def held(path, **kw):
    """The image open read-write (the verbs' adversary)."""
    return vblock.open_image(path, cache="writeback", **kw)


def test_info_refused_while_image_is_written(raw):
    with held(raw, format="raw"):
        r = run_cli("info", "-f", "raw", raw)
    assert r.rc == 1 and r.out == ""
    assert r.err_lines == [f'vblock: error: {raw}: failed to get shared "write" lock: {HELD}']


def test_info_force_share_works_while_image_is_written(raw):
    with held(raw, format="raw"):
        r = run_cli("info", "-U", "-f", "raw", raw)
    assert r.rc == 0, r.err
    assert "virtual size: 1 MiB" in r.out


def test_info_long_force_share_option(qed):
    with held(qed):
        r = run_cli("info", "--force-share", "--output", "json", qed)
    assert r.rc == 0, r.err
    assert '"format": "qed"' in r.out


def test_map_refused_while_image_is_written(qed):
    with held(qed):
        r = run_cli("map", qed)
    assert r.rc == 1 and len(r.err_lines) == 1
    assert 'failed to get shared "write" lock' in r.err


def test_map_force_share_works_while_image_is_written(qed):
    with held(qed):
        r = run_cli("map", "-U", qed)
    assert r.rc == 0, r.err
    assert r.out.splitlines()[1].split()[:2] == ["0", "0x10000"]


def test_check_force_share_works_while_image_is_written(qed):
    with held(qed):
        r = run_cli("check", "-U", qed)
    assert r.rc == 0, r.err
    assert "No errors were found on the image." in r.out


def test_check_refused_while_image_is_written(qed):
    with held(qed):
        r = run_cli("check", qed)
    assert r.rc == 1 and len(r.err_lines) == 1
    assert 'failed to get shared "write" lock' in r.err


def test_check_repair_with_force_share_is_a_usage_error(qed):
    before = digest(qed)
    r = run_cli("check", "-r", "all", "-U", qed)
    assert r.rc == 1
    assert r.err_lines == [
        "vblock: error: check: -U/--force-share cannot be used with -r "
        "(a repair writes to the image)"
    ]
    assert digest(qed) == before


def test_check_repair_refused_while_image_is_read(qed):
    before = digest(qed)
    with vblock.open_image(qed, read_only=True):
        r = run_cli("check", "-r", "all", qed)
    assert r.rc == 1
    assert r.err_lines == [f'vblock: error: {qed}: failed to get "write" lock: {HELD}']
    assert digest(qed) == before


def test_resize_refused_while_image_is_read(raw):
    before = digest(raw)
    with vblock.open_image(raw, format="raw", read_only=True):
        r = run_cli("resize", "-f", "raw", raw, "2M")
    assert r.rc == 1
    assert r.err_lines == [f'vblock: error: {raw}: failed to get "write" lock: {HELD}']
    assert os.path.getsize(raw) == SIZE and digest(raw) == before


def test_rebase_refused_while_image_is_read(qed, raw):
    before = digest(qed)
    with vblock.open_image(qed, read_only=True):
        r = run_cli("rebase", "-u", "-b", raw, "-F", "raw", qed)
    assert r.rc == 1 and len(r.err_lines) == 1
    assert 'failed to get "write" lock' in r.err
    assert digest(qed) == before


def test_compare_refused_while_image_is_written(raw, scratch):
    other = scratch / "copy.raw"
    other.write_bytes(pathlib.Path(raw).read_bytes())
    with held(raw, format="raw"):
        r = run_cli("compare", "-f", "raw", "-F", "raw", raw, other)
    assert r.rc == 2 and r.out == ""  # an open error: qemu-img compare's status 2
    assert r.err_lines == [f'vblock: error: {raw}: failed to get shared "write" lock: {HELD}']


def test_compare_force_share_works_while_image_is_written(raw, scratch):
    other = scratch / "copy.raw"
    other.write_bytes(pathlib.Path(raw).read_bytes())
    with held(raw, format="raw"):
        r = run_cli("compare", "-U", "-f", "raw", "-F", "raw", raw, other)
    assert r.rc == 0, r.err
    assert r.out.strip() == "Images are identical."


def test_convert_refused_while_source_is_written(raw, scratch):
    dst = scratch / "out.raw"
    with held(raw, format="raw"):
        r = run_cli("convert", "-f", "raw", "-O", "raw", raw, dst)
    assert r.rc == 1 and len(r.err_lines) == 1
    assert 'failed to get shared "write" lock' in r.err
    assert not dst.exists()


def test_convert_force_share_reads_a_source_being_written(raw, scratch):
    dst = scratch / "out.raw"
    with held(raw, format="raw"):
        r = run_cli("-q", "convert", "-U", "-f", "raw", "-O", "raw", raw, dst)
    assert r.rc == 0, r.err
    assert digest(dst) == digest(raw)

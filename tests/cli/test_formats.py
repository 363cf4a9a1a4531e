"""Foreign formats and missing backing files at the command line.

Every verb that opens an image refuses a file whose header shows a format vblock has no driver
for, with one line naming the format, and leaves it unchanged; ``-f raw`` still opens it. A QED
file cut short is a corrupt QED. ``info``, ``check``, ``map`` and ``rebase -u`` work on an image
whose backing file is missing; the verbs that need its data fail with one line naming both files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

import vblock
from tests.cli.clitools import run_cli
from tests.files import digest
from vblock.testing import foreign

MiB = 1 << 20
CS = 64 << 10
UNSUPPORTED = (
    "image format 'vmdk' is not supported (vblock reads raw, qcow2, qed); "
    "convert it with qemu-img convert -O qed"
)

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed (apt-get install qemu-utils)"
)


def _one_line(r, *fragments, status=(1,)):
    assert r.rc in status, (r.rc, r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("vblock: error: ") and "Traceback" not in r.err
    for f in fragments:
        assert f in line, line
    return line


@pytest.fixture
def foreign_image(scratch):
    """A hand-made vmdk header (a format with no driver; no qemu-img needed) and its checksum."""
    path = scratch / "disk.vmdk"
    path.write_bytes(foreign.sample("vmdk"))
    return path, digest(path)


# -- foreign formats: every verb refuses, nothing changes -------------------------------------------
def test_info_refuses_a_foreign_format(foreign_image):
    path, before = foreign_image
    line = _one_line(run_cli("info", path))
    assert line == f"vblock: error: {path}: {UNSUPPORTED}"
    assert digest(path) == before


def test_info_json_refuses_a_foreign_format(foreign_image):
    path, before = foreign_image
    _one_line(run_cli("info", "--output=json", path), UNSUPPORTED)
    assert digest(path) == before


def test_convert_refuses_a_foreign_format_and_creates_nothing(foreign_image, scratch):
    path, before = foreign_image
    _one_line(run_cli("convert", "-O", "raw", path, scratch / "out.raw"), str(path), UNSUPPORTED)
    assert digest(path) == before
    assert sorted(os.listdir(scratch)) == ["disk.vmdk"]


def test_compare_refuses_a_foreign_format(foreign_image, scratch):
    path, before = foreign_image
    other = scratch / "other.raw"
    other.write_bytes(bytes(len(foreign.sample("vmdk"))))
    # compare answers an error with qemu-img's status 2, the other verbs with 1
    _one_line(run_cli("compare", other, path), str(path), UNSUPPORTED, status=(2,))
    assert digest(path) == before


def test_map_refuses_a_foreign_format(foreign_image):
    path, before = foreign_image
    _one_line(run_cli("map", path), str(path), UNSUPPORTED)
    assert digest(path) == before


def test_check_refuses_a_foreign_format(foreign_image):
    path, before = foreign_image
    _one_line(run_cli("check", path), str(path), UNSUPPORTED)
    assert digest(path) == before


def test_check_repair_refuses_a_foreign_format(foreign_image):
    path, before = foreign_image
    _one_line(run_cli("check", "-r", "all", path), str(path), UNSUPPORTED)
    assert digest(path) == before


def test_stress_image_refuses_a_foreign_format(foreign_image):
    path, before = foreign_image
    _one_line(
        run_cli("stress", "--image", path, "--duration", "0.1", "--seed", "1"),
        str(path),
        UNSUPPORTED,
    )
    assert digest(path) == before


def test_serve_refuses_a_foreign_format_before_listening(foreign_image, scratch):
    path, before = foreign_image
    sock = scratch / "vhost.sock"
    _one_line(run_cli("serve", "--vhost-user", sock, path), str(path), UNSUPPORTED)
    assert digest(path) == before
    assert not sock.exists()


def test_resize_refuses_a_foreign_format(foreign_image):
    path, before = foreign_image
    r = run_cli("resize", path, "+1M")
    _one_line(r, str(path), UNSUPPORTED)
    assert digest(path) == before


def test_info_with_explicit_raw_shows_a_foreign_file_as_raw(foreign_image):
    path, before = foreign_image
    r = run_cli("info", "-f", "raw", path)
    assert r.rc == 0, r.err
    assert "file format: raw" in r.out.splitlines()
    assert digest(path) == before


def test_convert_with_explicit_raw_copies_a_foreign_file_byte_for_byte(foreign_image, scratch):
    path, before = foreign_image
    r = run_cli("convert", "-f", "raw", "-O", "raw", path, scratch / "copy.raw")
    assert r.rc == 0, r.err
    assert digest(scratch / "copy.raw") == before == digest(path)


@pytest.mark.parametrize("name", foreign.FORMATS)
def test_info_names_each_hand_made_foreign_format(scratch, name):
    path = scratch / f"disk.{name}"
    path.write_bytes(foreign.sample(name))
    before = digest(path)
    _one_line(run_cli("info", path), f"image format '{foreign.FORMAT_OF[name]}' is not supported")
    assert digest(path) == before


@needs_qemu_img
@pytest.mark.parametrize("name", sorted(foreign.QEMU_IMG_CREATE))
def test_info_and_stress_refuse_each_qemu_img_format(scratch, name):
    fmt, extra = foreign.QEMU_IMG_CREATE[name]
    path = scratch / f"disk.{name}"
    p = subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, *extra, str(path), "1M"],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"this qemu-img cannot create {name}: {p.stderr.strip()}")
    before = digest(path)
    _one_line(run_cli("info", path), str(path), f"image format '{fmt}' is not supported")
    _one_line(
        run_cli("stress", "--image", path, "--duration", "0.1", "--seed", "1"),
        f"image format '{fmt}' is not supported",
    )
    assert digest(path) == before


# -- a QED file cut short ---------------------------------------------------------------------------
def test_info_on_a_qed_file_of_just_the_magic_is_a_corrupt_header(scratch):
    path = scratch / "short.qed"
    path.write_bytes(b"QED\0")
    _one_line(run_cli("info", path), f"{path}: header")
    assert path.read_bytes() == b"QED\0"


def test_check_repair_on_a_partial_qed_header_is_a_corrupt_header(scratch):
    path = scratch / "short.qed"
    from vblock.drivers.qed import format as fmt

    data = fmt.Header(image_size=MiB).pack()[:40]
    path.write_bytes(data)
    _one_line(run_cli("check", "-r", "all", path), f"{path}: header")
    assert path.read_bytes() == data


# -- a missing backing file -------------------------------------------------------------------------
@pytest.fixture
def orphan(scratch):
    """top.qed over base.raw (raw recorded), with data in its first cluster; base.raw removed."""
    (scratch / "base.raw").write_bytes(b"\x05" * MiB)
    top = scratch / "top.qed"
    with vblock.create_image(
        str(top), "qed", MiB, backing_file="base.raw", backing_fmt="raw"
    ) as img:
        img.write(0, b"\x07" * CS)
    (scratch / "base.raw").unlink()
    return top, digest(top)


MISSING = "cannot open backing file base.raw: No such file or directory"


def test_info_shows_an_image_whose_backing_file_is_missing(orphan):
    top, before = orphan
    r = run_cli("info", top)
    assert r.rc == 0 and r.err == ""
    lines = r.out.splitlines()
    assert f"image: {top}" in lines and "file format: qed" in lines
    assert any(line.startswith("backing file: base.raw") for line in lines)
    assert "backing file format: raw" in lines
    assert digest(top) == before


def test_info_json_shows_the_missing_backing_file_by_name(orphan, scratch):
    top, before = orphan
    d = json.loads(run_cli("info", "--output=json", top).out)
    assert d["backing-filename"] == "base.raw"
    assert d["full-backing-filename"] == str(scratch / "base.raw")
    assert d["backing-filename-format"] == "raw"
    assert digest(top) == before


def test_info_backing_chain_with_a_missing_backing_file_is_one_line_naming_both(orphan):
    top, before = orphan
    line = _one_line(run_cli("info", "--backing-chain", top))
    assert line == f"vblock: error: {top}: {MISSING}"
    assert digest(top) == before


def test_check_an_image_whose_backing_file_is_missing(orphan):
    top, before = orphan
    r = run_cli("check", top)
    assert r.rc == 0, r.err
    assert "No errors were found on the image." in r.out.splitlines()
    assert digest(top) == before


def test_check_repair_an_image_whose_backing_file_is_missing(orphan):
    top, _ = orphan
    r = run_cli("check", "-r", "all", "--output=json", top)
    assert r.rc == 0, r.err
    d = json.loads(r.out)
    assert d["check-errors"] == 0 and "corruptions" not in d and "leaks" not in d
    assert json.loads(run_cli("info", "--output=json", top).out)["backing-filename"] == "base.raw"


def test_map_an_image_whose_backing_file_is_missing_shows_its_own_allocation(orphan):
    top, before = orphan
    r = run_cli("map", "--output=json", top)
    assert r.rc == 0
    assert r.err_lines == [
        f"vblock: warning: {top}: {MISSING}; showing {top}'s own allocation only"
    ]
    entries = json.loads(r.out)
    assert [(e["start"], e["length"], e["depth"], e["present"], e["data"]) for e in entries] == [
        (0, CS, 0, True, True),
        (CS, MiB - CS, 0, False, False),
    ]
    assert digest(top) == before


def test_rebase_unsafe_mends_an_image_whose_backing_file_is_missing(orphan, scratch):
    top, _ = orphan
    (scratch / "new.raw").write_bytes(b"\x05" * MiB)
    r = run_cli("rebase", "-u", "-b", "new.raw", top)
    assert (r.rc, r.err) == (0, "")
    d = json.loads(run_cli("info", "--output=json", top).out)
    assert d["backing-filename"] == "new.raw" and d["backing-filename-format"] == "raw"
    with vblock.open_image(top, read_only=True) as img:  # the whole chain opens again
        assert img.read(0, 4) == b"\x07" * 4 and img.read(CS, 4) == b"\x05" * 4


def test_rebase_unsafe_with_format_mends_an_image_whose_backing_file_is_missing(orphan, scratch):
    top, _ = orphan
    (scratch / "new.raw").write_bytes(b"\x05" * MiB)
    assert run_cli("rebase", "-u", "-b", "new.raw", "-F", "raw", top).rc == 0
    assert json.loads(run_cli("info", "--output=json", top).out)["backing-filename"] == "new.raw"


def test_convert_an_image_whose_backing_file_is_missing_is_one_line_naming_both(orphan, scratch):
    top, before = orphan
    line = _one_line(run_cli("convert", "-O", "raw", top, scratch / "flat.raw"))
    assert line == f"vblock: error: {top}: {MISSING}"
    assert not (scratch / "flat.raw").exists()
    assert digest(top) == before


def test_compare_an_image_whose_backing_file_is_missing_is_one_line_naming_both(orphan, scratch):
    top, before = orphan
    (scratch / "other.raw").write_bytes(bytes(MiB))
    # compare answers an error with qemu-img's status 2
    _one_line(run_cli("compare", top, scratch / "other.raw"), f"{top}: {MISSING}", status=(2,))
    assert digest(top) == before

"""``vblock info/check/map --output=json`` agree with qemu-img's on the same images, and what
``vblock convert`` writes passes ``qemu-img check`` and ``qemu-img compare``."""

from __future__ import annotations

import json
import os
import struct

import pytest

from tests.cli.clitools import needs_qemu, qemu, run_cli

pytestmark = [needs_qemu, pytest.mark.interop]

MiB = 1 << 20


@pytest.fixture
def chain(scratch):
    """base.raw (1 MiB of data in 16 MiB) <- top.qed (32 MiB: a data cluster, a zero cluster),
    made and written by qemu-img / qemu-io."""
    qemu("qemu-img", "create", "-q", "-f", "raw", "base.raw", "16M", cwd=scratch)
    qemu("qemu-io", "-f", "raw", "-c", "write -P 0xaa 0 1M", "base.raw", cwd=scratch)
    qemu(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "top.qed",
        "32M",
        cwd=scratch,
    )
    qemu(
        "qemu-io",
        "-f",
        "qed",
        "-c",
        "write -P 0xbb 2M 64k",
        "-c",
        "write -z 4M 64k",
        "-c",
        "write -P 0xcc 9M 200k",
        "top.qed",
        cwd=scratch,
    )
    return scratch


def _both(verb, name, cwd, *extra):
    ours = run_cli(verb, "--output=json", *extra, name, cwd=cwd)
    theirs = qemu("qemu-img", verb, "--output=json", *extra, name, cwd=cwd, check=False)
    return ours, theirs


@pytest.mark.parametrize("name", ["top.qed", "base.raw"])
def test_info_json_equals_qemu_img(chain, name):
    ours, theirs = _both("info", name, chain)
    assert ours.rc == theirs.returncode == 0
    assert json.loads(ours.out) == json.loads(theirs.stdout)


def test_info_json_equals_qemu_img_on_a_vblock_image(scratch):
    assert (
        run_cli(
            "create", "-f", "qed", "-o", "cluster_size=4k,table_size=2", scratch / "v.qed", "5M"
        ).rc
        == 0
    )
    ours, theirs = _both("info", "v.qed", scratch)
    assert json.loads(ours.out) == json.loads(theirs.stdout)


@pytest.mark.parametrize("name", ["top.qed", "base.raw"])
def test_map_json_equals_qemu_img(chain, name):
    ours, theirs = _both("map", name, chain)
    assert ours.rc == theirs.returncode == 0
    assert json.loads(ours.out) == json.loads(theirs.stdout)


def test_map_json_equals_qemu_img_on_a_qed_chain(scratch):
    qemu("qemu-img", "create", "-q", "-f", "qed", "low.qed", "8M", cwd=scratch)
    qemu("qemu-io", "-f", "qed", "-c", "write -P 1 1M 128k", "low.qed", cwd=scratch)
    qemu(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "low.qed",
        "-F",
        "qed",
        "up.qed",
        "12M",
        cwd=scratch,
    )
    qemu("qemu-io", "-f", "qed", "-c", "write -P 2 1M 64k", "up.qed", cwd=scratch)
    ours, theirs = _both("map", "up.qed", scratch)
    assert json.loads(ours.out) == json.loads(theirs.stdout)


def _corrupt_l2_entry(path, index, value):
    with open(path, "r+b") as f:
        f.seek(40)
        l1 = struct.unpack("<Q", f.read(8))[0]
        f.seek(l1)
        l2 = struct.unpack("<Q", f.read(8))[0]
        f.seek(l2 + 8 * index)
        f.write(struct.pack("<Q", value))


def test_check_json_and_exit_codes_equal_qemu_img(chain):
    ours, theirs = _both("check", "top.qed", chain)
    assert ours.rc == theirs.returncode == 0
    assert json.loads(ours.out) == json.loads(theirs.stdout)
    top = chain / "top.qed"
    with open(top, "r+b") as f:  # a leaked cluster at the end
        f.truncate(os.path.getsize(top) + 65536)
    ours, theirs = _both("check", "top.qed", chain)
    assert ours.rc == theirs.returncode == 3
    assert json.loads(ours.out) == json.loads(theirs.stdout)
    _corrupt_l2_entry(top, 1, 7 * 65536 * 1000)  # past the end of the file
    ours, theirs = _both("check", "top.qed", chain)
    assert ours.rc == theirs.returncode == 2
    assert json.loads(ours.out) == json.loads(theirs.stdout)


def test_convert_result_passes_qemu_img_check_and_compare(chain):
    for fmt, name, extra in (
        ("qed", "flat.qed", []),
        ("raw", "flat.raw", []),
        ("qed", "thin.qed", ["-B", "base.raw", "-F", "raw"]),
    ):
        r = run_cli("convert", "-O", fmt, *extra, "top.qed", name, cwd=chain)
        assert r.rc == 0, r.err
        if fmt == "qed":
            assert qemu("qemu-img", "check", name, cwd=chain).returncode == 0
        assert (
            qemu("qemu-img", "compare", "top.qed", name, cwd=chain).stdout
            == "Images are identical.\n"
        )
    assert (
        json.loads(qemu("qemu-img", "map", "--output=json", "thin.qed", cwd=chain).stdout)[0][
            "depth"
        ]
        == 1
    )


def test_vblock_create_matches_qemu_img_create_byte_for_byte(scratch):
    assert (
        run_cli("create", "-f", "qed", "-b", "base.raw", "-F", "raw", scratch / "v.qed", "1G").rc
        == 1
    )  # no base yet
    qemu("qemu-img", "create", "-q", "-f", "raw", "base.raw", "1G", cwd=scratch)
    assert (
        run_cli("create", "-f", "qed", "-b", "base.raw", "-F", "raw", "v.qed", cwd=scratch).rc == 0
    )
    qemu(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qed",
        "-b",
        "base.raw",
        "-F",
        "raw",
        "q.qed",
        "1G",
        cwd=scratch,
    )
    assert (scratch / "v.qed").read_bytes() == (scratch / "q.qed").read_bytes()

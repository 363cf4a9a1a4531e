"""``vblock stress``: a short run passes and verifies data; a backend that flips one byte fails it,
naming the offset; the model accepts exactly what overlapping requests may leave behind."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.cli import flip_driver
from tests.cli.clitools import qemu, run_cli, run_cmd
from vblock.block import register
from vblock.block.registry import unregister
from vblock.testing import stress


def test_short_stress_run_passes_and_verifies_blocks(scratch):
    r = run_cmd(
        "stress",
        "--duration",
        "1",
        "--size",
        "16M",
        "--queues",
        "2",
        "--depth",
        "8",
        "--seed",
        "7",
        "--output=json",
        "--keep",
        cwd=scratch,
    )
    assert r.rc == 0, r.err
    rep = json.loads(r.out)
    assert rep["ok"] is True and rep["seed"] == 7 and (rep["queues"], rep["depth"]) == (2, 8)
    assert rep["verified-blocks"] > 0 and rep["stamped-blocks"] > 0 and rep["swept-blocks"] > 0
    assert rep["mismatch-count"] == 0 and rep["error-count"] == 0
    assert (
        set(rep["ops"]) == {"read", "write", "flush", "discard", "write-zeroes"}
        and min(rep["ops"].values()) > 0
    )
    assert rep["check"]["corruptions"] == 0 and rep["check"]["leaks"] == 0
    assert rep["kept"] is True and os.path.exists(rep["image"])
    try:
        if shutil.which("qemu-img"):  # the kept image is a valid QED image for QEMU too
            assert qemu("qemu-img", "check", rep["image"]).returncode == 0
    finally:
        shutil.rmtree(os.path.dirname(rep["image"]))


def test_stress_removes_its_temporary_directory_and_prints_a_summary():
    r = run_cli(
        "stress",
        "--duration",
        "0.3",
        "--size",
        "8M",
        "--queues",
        "1",
        "--depth",
        "4",
        "--seed",
        "1",
    )
    assert r.rc == 0, r.err
    rows = dict(
        line.split(None, 1) if " " in line else (line, "") for line in r.out.splitlines()[2:]
    )
    assert rows["result"] == "PASS" and rows["mismatches"] == "0"
    image = next(line for line in r.out.splitlines() if line.startswith("image")).split()[1]
    assert image.endswith("stress.qed") and not os.path.exists(os.path.dirname(image))


@pytest.fixture
def flipraw():
    """The lying driver, registered for one test only (other tests list the known formats)."""
    register(flip_driver.FORMAT, flip_driver.FlipRawDriver)
    yield flip_driver.FORMAT
    unregister(flip_driver.FORMAT)


def test_a_backend_that_flips_a_byte_fails_the_run_and_is_named(flipraw):
    r = run_cli("stress", "--format", flipraw, "--duration", "0.5", "--size", "4M", "--seed", "5")
    assert r.rc == 2
    assert "result           FAIL" in r.out
    lines = [ln for ln in r.err_lines if ln.startswith("vblock: error: data mismatch at offset")]
    assert lines, r.err
    sector = flip_driver.FLIP_OFFSET // 512 * 512
    assert all(f"offset {sector} " in ln for ln in lines)
    assert any(f"byte {flip_driver.FLIP_OFFSET} " in ln for ln in lines)


def test_stress_over_an_existing_image_verifies_only_what_it_wrote(scratch):
    p = scratch / "given.raw"
    p.write_bytes(os.urandom(2 << 20))
    r = run_cli(
        "stress",
        "--image",
        p,
        "--format",
        "raw",
        "--duration",
        "0.3",
        "--seed",
        "2",
        "--output=json",
    )
    assert r.rc == 0, r.err
    rep = json.loads(r.out)
    assert rep["image"] == str(p) and rep["check"] is None and os.path.exists(p)
    assert rep["unverified-blocks"] > 0 and rep["verified-blocks"] > 0


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["--size", "10Q"], "invalid size '10Q'"),
        (["--format", "qcow7"], "unknown format 'qcow7'"),
        (["--queues", "0"], "must be at least 1"),
        (["--duration", "soon"], "invalid duration"),
        (["--image", "/nonexistent/dir/x.qed"], "/nonexistent/dir/x.qed"),
    ],
)
def test_stress_bad_inputs(argv, fragment):
    r = run_cli("stress", *argv)
    assert r.rc == 1 and len(r.err_lines) == 1 and fragment in r.err, r.err


# -- stamps and the model ---------------------------------------------------------------------------
def test_stamps_name_their_generation_and_catch_any_changed_byte():
    data = stress.stamp(8192, 1024, 42, 0x1234)
    assert stress.read_sector(data, 0, 8192, 0x1234) == 42
    assert stress.read_sector(data, 512, 8704, 0x1234) == 42
    assert "misplaced" in stress.read_sector(data, 512, 8192, 0x1234)
    assert "another run" in stress.read_sector(data, 0, 8192, 0x9999)
    bad = bytearray(data)
    bad[300] ^= 1
    assert (
        stress.read_sector(bad, 0, 8192, 0x1234)
        == f"generation 42 with byte 8492 changed ({data[300] ^ 1:#04x} instead of {data[300]:#04x}): checksum fails"
    )
    assert stress.read_sector(bytes(512), 0, 0, 1) == stress.ZERO
    junk = bytearray(512)
    junk[100] = 7
    assert "first non-zero byte 0x07 at offset 100" in stress.read_sector(junk, 0, 0, 1)


def _op(t, value, first=0, count=1):
    return stress._Op(t, value, first, count, 0)


def test_model_overlapping_writes_allow_either_and_nothing_older():
    m = stress.Model()
    w1, w2 = _op(stress.OUT, 1), _op(stress.OUT, 2)
    m.issue(w1)
    r = _op(stress.IN, None)
    m.issue(r)  # issued while w1 is in flight: old zeros or 1
    m.issue(w2)  # w2 joins while r is in flight: r may see it too
    assert r.allowed[0] == {0, 1, 2}
    m.complete(w1)
    assert set(m.possible(0)) == {1, 2}  # w2 may have landed before w1
    m.complete(w2)
    assert set(m.possible(0)) == {1, 2}  # either landed last; zeros are gone
    w3 = _op(stress.OUT, 3)
    m.issue(w3)
    m.complete(w3)
    assert tuple(m.possible(0)) == (3,)


def test_model_discard_keeps_old_data_possible_and_write_zeroes_does_not():
    m = stress.Model()
    for op in (_op(stress.OUT, 5), _op(stress.DISCARD, stress.ZERO)):
        m.issue(op)
        m.complete(op)
    assert set(m.possible(0)) == {0, 5}
    wz = _op(stress.WZ, stress.ZERO)
    m.issue(wz)
    m.complete(wz)
    assert tuple(m.possible(0)) == (0,)
    assert m.touched == {0}


def test_model_reads_do_not_change_what_is_possible():
    m = stress.Model(base=stress.UNKNOWN)
    r = _op(stress.IN, None, 4, 2)
    m.issue(r)
    m.complete(r)
    assert r.allowed == {4: {stress.UNKNOWN}, 5: {stress.UNKNOWN}}
    assert m.inflight == {} and m.touched == set()

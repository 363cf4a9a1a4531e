"""qemu-img's manners: compare's exit codes, ``resize -512M``, ``--version``, ``-o help``, only
formats that make files, huge sizes as one line, and ``stress`` that never creates ``--image`` and
names the host's errno of a failed request."""

from __future__ import annotations

import errno
import json
import os
import pathlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vblock
from tests.cli.clitools import run_cli, run_cmd
from tests.files import digest
from vblock.block.image import Image
from vblock.block.registry import register, unregister
from vblock.cli.output import MAX_BYTES, UsageError, parse_size
from vblock.drivers.raw.driver import RawDriver
from vblock.future import failed

MiB = 1 << 20


def one_error_line(r, rc, *fragments):
    assert r.rc == rc, (r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("vblock: error: ") and "Traceback" not in r.err
    for f in fragments:
        assert f in line, line
    return line


@pytest.fixture
def pair(scratch):
    """Two raw images of 1 MiB: a.raw and b.raw, equal."""
    data = os.urandom(MiB)
    for name in ("a.raw", "b.raw"):
        (scratch / name).write_bytes(data)
    return scratch / "a.raw", scratch / "b.raw"


# -- compare: 0 identical, 1 different, 2 and up errors ---------------------------------------
def test_compare_identical_images_exit_0(pair):
    r = run_cli("compare", "-f", "raw", "-F", "raw", *pair)
    assert (r.rc, r.out, r.err) == (0, "Images are identical.\n", "")


def test_compare_different_images_exit_1(pair):
    with open(pair[1], "r+b") as f:
        f.seek(4097)
        f.write(b"\xff" if pathlib.Path(pair[0]).read_bytes()[4097] != 0xFF else b"\x00")
    r = run_cli("compare", "-f", "raw", "-F", "raw", *pair)
    assert (r.rc, r.out) == (1, "Content mismatch at offset 4097!\n")


def test_compare_sizes_differ_in_strict_mode_exit_1(pair):
    with open(pair[1], "ab") as f:
        f.write(bytes(4096))
    r = run_cli("compare", "-s", "-f", "raw", "-F", "raw", *pair)
    assert r.rc == 1 and r.out.startswith("Strict mode: Image size mismatch!")


def test_compare_a_missing_image_exits_2(pair, scratch):
    r = run_cli("compare", "-f", "raw", pair[0], scratch / "nope.raw")
    one_error_line(r, 2, "nope.raw", "No such file")


def test_compare_bad_arguments_exit_2(pair):
    one_error_line(run_cli("compare", pair[0]), 2, "the following arguments are required: B")


def test_compare_a_block_status_failure_exits_3(pair, monkeypatch):
    def broken(self, offset, length):
        raise OSError(errno.EIO, "Input/output error", "a.raw")

    monkeypatch.setattr(Image, "block_status", broken)
    one_error_line(
        run_cli("compare", "-f", "raw", "-F", "raw", *pair), 3, "a.raw: Input/output error"
    )


def test_compare_a_read_failure_exits_4(pair, monkeypatch):
    def broken(self, offset, length):
        raise OSError(errno.EIO, "Input/output error", "b.raw")

    monkeypatch.setattr(Image, "read", broken)
    one_error_line(
        run_cli("compare", "-f", "raw", "-F", "raw", *pair), 4, "b.raw: Input/output error"
    )


def test_compare_exit_codes_reach_the_shell(pair):
    r = run_cmd("compare", "-f", "raw", pair[0], pair[0].parent / "nope.raw")
    assert r.rc == 2 and len(r.err_lines) == 1


# -- resize -512M ---------------------------------------------------------------------------------
def test_resize_takes_a_negative_size_without_double_dash(scratch):
    p = scratch / "r.raw"
    p.write_bytes(bytes(2 * MiB))
    r = run_cli("resize", "--shrink", "-f", "raw", p, "-512K")
    assert (r.rc, r.out) == (0, "Image resized to 1572864 bytes (1.5 MiB).\n"), r.err
    assert os.path.getsize(p) == 1536 * 1024


def test_resize_by_a_negative_size_still_needs_shrink(scratch):
    p = scratch / "r.raw"
    p.write_bytes(bytes(2 * MiB))
    one_error_line(run_cli("resize", "-f", "raw", p, "-1M"), 1, "give --shrink")
    assert os.path.getsize(p) == 2 * MiB


# -- --version ------------------------------------------------------------------------------------
def test_version_prints_the_package_version():
    r = run_cli("--version")
    assert (r.rc, r.out, r.err) == (0, f"vblock {vblock.__version__}\n", "")


# -- -o help --------------------------------------------------------------------------------------
def test_create_o_help_lists_the_formats_create_options(scratch):
    r = run_cli("create", "-f", "qed", "-o", "help")
    assert r.rc == 0 and r.err == ""
    lines = r.out.splitlines()
    assert lines[0] == "Supported options:"
    assert [ln.split("=")[0].strip() for ln in lines[1:]] == [
        "backing_file",
        "backing_fmt",
        "cluster_size",
        "table_size",
    ]
    assert "cluster_size=<size>" in r.out and "table_size=<num>" in r.out
    assert os.listdir(scratch) == []


def test_convert_o_help_lists_the_destination_formats_options(scratch):
    r = run_cli("convert", "-O", "raw", "-o", "?")
    assert r.rc == 0 and r.out.splitlines()[0] == "Supported options:"
    assert "preallocation=<str>" in r.out and "off" in r.out and "full" in r.out
    assert os.listdir(scratch) == []


# -- only formats that make files ---------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["null", "memory"])
def test_create_refuses_a_format_that_makes_no_file(scratch, fmt):
    r = run_cli("create", "-f", fmt, scratch / "x.img", "1M")
    one_error_line(
        r, 1, f"format '{fmt}' makes no image file", "formats that can be created: qed, raw"
    )
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("fmt", ["null", "memory"])
def test_convert_refuses_a_format_that_makes_no_file(pair, fmt):
    before = sorted(os.listdir(pair[0].parent))
    r = run_cli("convert", "-f", "raw", "-O", fmt, pair[0], pair[0].parent / "x.img")
    one_error_line(r, 1, f"format '{fmt}' makes no image file", "qed, raw")
    assert sorted(os.listdir(pair[0].parent)) == before


# -- huge sizes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["raw", "qed"])
def test_create_16e_is_one_line(scratch, fmt):
    r = run_cli("create", "-f", fmt, scratch / "x.img", "16E")
    one_error_line(r, 1, "invalid size '16E'", "the most a host file can hold")
    assert os.listdir(scratch) == []


def test_create_a_qed_image_larger_than_its_geometry_is_one_line(scratch):
    r = run_cli("create", "-f", "qed", scratch / "x.qed", "7E")
    one_error_line(r, 1, "x.qed: QED image size must be at most")
    assert os.listdir(scratch) == []


@pytest.mark.parametrize("size", ["16E", "+8E"])
def test_resize_past_what_a_host_file_holds_is_one_line(scratch, size):
    p = scratch / "r.raw"
    p.write_bytes(bytes(MiB))
    before = digest(p)
    one_error_line(run_cli("resize", "-f", "raw", p, size), 1, "the most a host file can hold")
    assert digest(p) == before


def test_stress_with_a_huge_size_is_one_line():
    one_error_line(run_cli("stress", "--size", "16E", "--duration", "0"), 1, "invalid size '16E'")


# -- stress ---------------------------------------------------------------------------------------
def test_stress_on_an_image_that_does_not_exist_creates_nothing(scratch):
    r = run_cli("stress", "--image", scratch / "none.qed", "--duration", "0.1")
    one_error_line(r, 1, "none.qed", "no such image")
    assert os.listdir(scratch) == []


NOSPACE_FROM = 2 * MiB  # writes reaching past this offset fail as a full disk would


class NoSpaceRawDriver(RawDriver):
    """A raw driver whose writes past ``NOSPACE_FROM`` fail with ENOSPC, as on a full file system."""

    format_name = "nospaceraw"

    def submit_write(self, offset, buffers, fua=False):
        if offset + sum(len(b) for b in buffers) > NOSPACE_FROM:
            return failed(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self.path))
        return super().submit_write(offset, buffers, fua)


@pytest.fixture
def nospace_format():
    register(NoSpaceRawDriver.format_name, NoSpaceRawDriver)
    yield NoSpaceRawDriver.format_name
    unregister(NoSpaceRawDriver.format_name)


def test_stress_names_the_host_errno_of_a_failed_request(scratch, nospace_format):
    p = scratch / "full.raw"
    p.write_bytes(bytes(4 * MiB))
    r = run_cli(
        "stress",
        "--image",
        p,
        "--format",
        nospace_format,
        "--duration",
        "0.3",
        "--seed",
        "3",
        "--output=json",
    )
    assert r.rc == 2, r.err
    rep = json.loads(r.out)
    assert rep["error-count"] > 0
    write_errors = [e for e in rep["errors"] if e.startswith("write ")]
    assert write_errors and all(
        e.endswith("failed with status IOERR (ENOSPC: No space left on device)")
        for e in write_errors
    ), rep["errors"]
    assert any("(ENOSPC: No space left on device)" in ln for ln in r.err_lines)


@given(st.integers(min_value=0, max_value=1 << 70))
def test_parse_size_takes_every_size_a_host_file_can_hold_and_no_more(n):
    if n <= MAX_BYTES:
        assert parse_size(str(n)) == n
    else:
        with pytest.raises(UsageError, match="the most a host file can hold"):
            parse_size(str(n))


@given(st.integers(min_value=0, max_value=1 << 14), st.sampled_from("kMGTPE"))
def test_parse_size_with_a_suffix_is_refused_exactly_past_the_limit(n, unit):
    value = n * 1024 ** ("kMGTPE".index(unit) + 1)
    if value <= MAX_BYTES:
        assert parse_size(f"{n}{unit}") == value
    else:
        with pytest.raises(UsageError, match="the most a host file can hold"):
            parse_size(f"{n}{unit}")

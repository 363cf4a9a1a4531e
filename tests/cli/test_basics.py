"""The boundary: parsing, sizes, exit codes, one-line errors, --debug, and the two entry points."""

from __future__ import annotations

import pytest

from tests.cli.clitools import run_cli, run_cmd
from vblock.cli import output
from vblock.cli.status import ExitStatus, check_status


@pytest.mark.parametrize(
    "text, value",
    [
        ("4096", 4096),
        ("64k", 64 << 10),
        ("64K", 64 << 10),
        ("512M", 512 << 20),
        ("10G", 10 << 30),
        ("1.5G", 3 << 29),
        ("2GiB", 2 << 30),
        ("1T", 1 << 40),
        ("0", 0),
        ("100b", 100),
    ],
)
def test_parse_size_accepts_qemu_img_sizes(text, value):
    assert output.parse_size(text) == value


@pytest.mark.parametrize("text", ["10Q", "-1", "", "G", "1.3", "ten", "1 0G"])
def test_parse_size_rejects_with_the_text_named(text):
    with pytest.raises(output.UsageError) as exc:
        output.parse_size(text)
    assert repr(text) in str(exc.value)


@pytest.mark.parametrize(
    "n, text",
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (593920, "580 KiB"),
        (33554432, "32 MiB"),
        (3 << 29, "1.5 GiB"),
        (1000 << 20, "1000 MiB"),
    ],
)
def test_human_size_matches_qemu_img_style(n, text):
    assert output.human_size(n) == text


def test_check_status_maps_results_to_qemu_img_codes():
    assert check_status({"check-errors": 0, "corruptions": 0, "leaks": 0}) == ExitStatus.SUCCESS
    assert (
        check_status({"check-errors": 0, "corruptions": 1, "leaks": 4})
        == ExitStatus.CORRUPTIONS
        == 2
    )
    assert check_status({"check-errors": 0, "corruptions": 0, "leaks": 4}) == ExitStatus.LEAKS == 3
    assert check_status({"check-errors": 1, "corruptions": 1, "leaks": 0}) == ExitStatus.ERROR == 1


def test_no_command_is_a_usage_error():
    r = run_cli()
    assert r.rc == 1
    assert r.err_lines[-1] == "vblock: error: a command is required (try: vblock --help)"


def test_help_lists_every_command_and_exits_0():
    r = run_cli("--help")
    assert r.rc == 0
    for verb in (
        "create",
        "info",
        "check",
        "map",
        "convert",
        "compare",
        "resize",
        "rebase",
        "bench",
        "stress",
    ):
        assert verb in r.out


def test_unknown_option_is_one_line_and_exit_1():
    r = run_cli("info", "--frobnicate", "x")
    assert r.rc == 1
    assert r.err_lines == ["vblock: error: unrecognized arguments: --frobnicate"]


def test_bad_choice_is_one_line_and_exit_1():
    r = run_cli("check", "-r", "everything", "x")
    assert r.rc == 1 and len(r.err_lines) == 1
    assert "invalid choice: 'everything'" in r.err


def test_console_entry_point_runs_as_a_module(tmp_path):
    r = run_cmd("create", "-f", "raw", tmp_path / "a.raw", "1M")
    assert r.rc == 0, r.err
    assert (tmp_path / "a.raw").stat().st_size == 1 << 20
    assert r.out.startswith(f"Formatting '{tmp_path / 'a.raw'}', fmt=raw size=1048576")


def test_errors_have_no_traceback_but_debug_shows_it(tmp_path):
    missing = tmp_path / "missing.qed"
    r = run_cmd("info", missing)
    assert r.rc == 1
    assert r.err == f"vblock: error: {missing}: No such file or directory\n"
    r = run_cmd("--debug", "info", missing)
    assert r.rc == 1
    assert "Traceback (most recent call last)" in r.err and "FileNotFoundError" in r.err


def test_debug_after_the_verb_also_counts(tmp_path):
    r = run_cmd("info", tmp_path / "missing.qed", "--debug")
    assert r.rc == 1 and "Traceback" in r.err


def test_ctrl_c_is_exit_130(monkeypatch, tmp_path):
    import vblock.cli.info as info

    def interrupted(args, env):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "run", interrupted)
    r = run_cli("info", tmp_path / "x")
    assert r.rc == ExitStatus.INTERRUPTED == 130
    assert r.err == "vblock: interrupted\n"


def test_an_unexpected_exception_is_one_line_naming_it(monkeypatch, tmp_path):
    import vblock.cli.info as info

    def broken(args, env):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(info, "run", broken)
    r = run_cli("info", tmp_path / "x")
    assert r.rc == 1
    assert r.err_lines == [
        "vblock: error: internal error: ZeroDivisionError: boom (run with --debug for the traceback)"
    ]

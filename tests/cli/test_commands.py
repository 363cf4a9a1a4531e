"""Every subcommand once as a real process (``python -m vblock``), in the order a user would meet
them, plus the broken-pipe manners of a command whose reader goes away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import vblock
from tests.cli.clitools import run_cmd

MiB = 1 << 20


def test_every_subcommand_as_a_process(scratch):
    d = scratch
    assert run_cmd("create", "-f", "raw", d / "base.raw", "4M").rc == 0
    with open(d / "base.raw", "r+b") as f:
        f.seek(MiB)
        f.write(b"\x3c" * 65536)
    r = run_cmd("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", d / "top.qed")
    assert (r.rc, r.out, r.err) == (0, "", "")
    info = json.loads(run_cmd("info", "--output=json", d / "top.qed").out)
    assert info["backing-filename"] == "base.raw" and info["virtual-size"] == 4 * MiB
    r = run_cmd("check", d / "top.qed")
    assert r.rc == 0 and r.out.startswith("No errors were found on the image.")
    entries = json.loads(run_cmd("map", "--output=json", d / "top.qed").out)
    assert [e["depth"] for e in entries if e["data"]] == [1]
    r = run_cmd("convert", "-q", "-O", "qed", d / "top.qed", d / "flat.qed")
    assert r.rc == 0 and r.err == ""
    assert run_cmd("compare", d / "top.qed", d / "flat.qed").out == "Images are identical.\n"
    r = run_cmd("resize", d / "flat.qed", "+1M")
    assert r.rc == 0 and r.out == "Image resized to 5242880 bytes (5 MiB).\n"
    assert run_cmd("rebase", "-u", "-b", "", d / "top.qed").rc == 0
    with vblock.open_image(str(d / "top.qed"), read_only=True) as img:
        assert img.backing is None
    r = run_cmd("compare", d / "top.qed", d / "flat.qed")
    assert r.rc == 1 and r.out == f"Content mismatch at offset {MiB}!\n"
    r = run_cmd("bench", "nosuch")
    assert r.rc == 1 and "unknown benchmark 'nosuch'" in r.err


def test_bench_host_runs_through_the_dispatcher():
    # vblock's own flags may follow the benchmark's name (-q was passed on and refused)
    r = run_cmd("bench", "host", "--duration", "0.05", "--no-peer", "--json", "-q", timeout=300)
    assert r.rc == 0, r.err
    rows = [json.loads(line) for line in r.out.splitlines()]
    assert (
        rows and {row["layer"] for row in rows} == {"host"} and all(row["iops"] > 0 for row in rows)
    )
    from vblock.bench import wake_round_trip

    if wake_round_trip(10) is not None:  # the machine gauge goes to stderr, off the JSON lines
        assert "cross-CPU wake-up round trip" in r.err


@pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed (apt-get install qemu-utils)"
)
def test_bench_convert_pairs_both_tools_and_verifies_the_result():
    """A small source, one pair per pairing: every pairing gives a row with both tools' times, and
    each vblock result passed qemu-img check and compare (run() raises otherwise)."""
    from vblock.bench import convert as bench

    rows = bench.run(rounds=2, size=64 * MiB, data=16 * MiB)
    assert [r.engine for r in rows] == ["default (unsafe)", "both writeback", "in-process, unsafe"]
    for r in rows:
        assert r.peer == "qemu-img convert" and r.seconds > 0 and r.peer_seconds > 0 and r.ratio > 0
        assert r.best_seconds <= r.seconds and r.peer_best_seconds <= r.peer_seconds


def test_a_closed_pipe_ends_the_command_quietly(scratch):
    """``vblock map ... | head``: the reader is gone before the first byte (its end of the pipe is
    closed before the command starts), so every write fails with EPIPE."""
    img = vblock.create_image(str(scratch / "d.qed"), "qed", 4 * MiB)
    img.close()
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.run(
            [sys.executable, "-m", "vblock", "map", "--output=json", str(scratch / "d.qed")],
            stdout=w,
            stderr=subprocess.PIPE,
            timeout=60,
        )
    finally:
        os.close(w)
    assert p.returncode == 1
    assert p.stderr == b""


def test_the_console_script_is_installed_beside_the_interpreter():
    """``pip install`` puts ``vblock`` next to the interpreter (the quick start's command)."""
    import pathlib

    import pytest

    script = pathlib.Path(sys.executable).with_name("vblock")
    if not script.exists():
        pytest.skip("vblock is not installed in this interpreter's environment (pip install -e .)")
    p = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "stress" in p.stdout and p.stderr == ""


def test_the_quick_exit_flushes_a_long_output_and_keeps_the_status(scratch):
    """``command()`` ends the process with ``os._exit`` once the verb is done: what the verb wrote
    is all there (here 2048 map entries, far more than one buffer, into a file), and the exit
    status is the verb's (compare of two different images: 1)."""
    path = str(scratch / "many.qed")
    with vblock.create_image(path, "qed", 64 * MiB, cluster_size=4096) as img:
        for i in range(2048):
            img.write(i * 2 * 4096, b"\x01" * 4096)  # every other cluster: 2048 data runs
    out = scratch / "map.json"
    with open(out, "wb") as f:
        p = subprocess.run(
            [sys.executable, "-m", "vblock", "map", "--output=json", path],
            stdout=f,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    assert p.returncode == 0 and p.stderr == b""
    entries = json.loads(out.read_text())
    assert sum(1 for e in entries if e["data"]) == 2048
    other = str(scratch / "other.qed")
    vblock.create_image(other, "qed", 64 * MiB).close()
    p = subprocess.run(
        [sys.executable, "-m", "vblock", "compare", path, other],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 1 and p.stdout == "Content mismatch at offset 0!\n"

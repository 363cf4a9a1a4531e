"""The machine gauge printed beside the host benchmark: a cross-CPU wake-up round trip."""

import os
import re

import pytest

from vblock.bench import host, wake_round_trip

two_cpus = pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2 or wake_round_trip(10) is None,
    reason="needs two CPUs that threads may be pinned to",
)


@two_cpus
def test_round_trip_is_measured_and_the_callers_cpus_are_given_back():
    before = os.sched_getaffinity(0)
    us = wake_round_trip(200)
    assert us is not None and 0 < us < 1e6
    assert os.sched_getaffinity(0) == before


@two_cpus
def test_a_cpu_the_peer_cannot_use_gives_no_reading_and_no_hang(monkeypatch):
    real = os.sched_getaffinity(0)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {min(real), 4095})
    try:
        assert wake_round_trip(10) is None
    finally:
        monkeypatch.undo()
        os.sched_setaffinity(0, real)
    assert os.sched_getaffinity(0) == real


def test_one_cpu_gives_no_reading():
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert wake_round_trip(10) is None
    finally:
        os.sched_setaffinity(0, before)


@two_cpus
def test_the_markdown_table_is_followed_by_one_reading_per_engine_and_one_at_the_end(capsys):
    assert host.main(["--duration", "0.05", "--rounds", "1", "--no-peer"]) == 0
    out = capsys.readouterr().out
    assert out.count("| host |") == 12
    line = next(ln for ln in out.splitlines() if ln.startswith("cross-CPU wake-up round trip"))
    assert len(re.findall(r"\d+", line.split(":", 1)[1].split("us")[0])) == 3

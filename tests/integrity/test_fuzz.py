"""Bounded coverage-guided fuzzing of the hostile inputs (QED and qcow2 files, virtqueue contents,
NBD bytes), and replay of every input that ever found a bug."""

import os
import pathlib
import subprocess
import sys

import pytest

from vblock.testing import fuzz

HERE = pathlib.Path(__file__).parent
SECONDS = float(os.environ.get("VBLOCK_FUZZ_SECONDS", "60"))


@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_regressions_replay_cleanly(target):
    inputs = sorted((HERE / "fuzz_regressions" / target).glob("*"))
    for p in inputs:
        getattr(fuzz, target)(p.read_bytes())
    for s in fuzz.seed_inputs(target):
        getattr(fuzz, target)(s)


@pytest.mark.timeout(SECONDS * 3 + 120)
@pytest.mark.parametrize("target", fuzz.TARGETS)
def test_bounded_fuzz_run_finds_nothing(target, tmp_path):
    seconds = SECONDS * fuzz.BUDGET_SHARE.get(target, 1.0)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "vblock.testing.fuzz",
            target,
            "--seconds",
            str(seconds),
            "--corpus",
            str(tmp_path / "corpus"),
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=SECONDS * 3 + 60,
    )
    crashes = list(tmp_path.glob("crash-*"))
    assert proc.returncode == 0 and not crashes, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Done" in proc.stderr or "without a finding" in proc.stdout

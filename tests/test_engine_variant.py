"""The named build variant of issue 2: the layers' I/O suites again, with every ``engine="auto"``
file served by the thread engine (``VBLOCK_ENGINE=threads``), as where io_uring is unavailable."""

import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITES = [
    "tests/block",
    "tests/qed",
    "tests/virtio/test_stack.py",
    "tests/integrity/test_io_errors.py",
]


@pytest.mark.timeout(900)
def test_io_suites_pass_on_the_thread_engine():
    env = {**os.environ, "VBLOCK_ENGINE": "threads"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *SUITES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    tail = proc.stdout[-3000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and " failed" not in proc.stdout, tail

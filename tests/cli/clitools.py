"""Running ``vblock`` from the command-line tests: in-process with an injected environment (fast)
or as a real command (``python -m vblock``), and qemu-img / qemu-io when they exist."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import subprocess
import sys

import pytest

from vblock.cli.main import main
from vblock.cli.output import Environment

needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img / qemu-io not installed (apt-get install qemu-utils)",
)


@dataclasses.dataclass
class Result:
    rc: int
    out: str
    err: str

    @property
    def err_lines(self):
        return self.err.splitlines()


def run_cli(*argv, cwd=None) -> Result:
    """``vblock ARGV`` in this process; streams are StringIO (not terminals: no progress)."""
    out, err = io.StringIO(), io.StringIO()
    old = os.getcwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        rc = main([str(a) for a in argv], Environment(stdout=out, stderr=err))
    finally:
        os.chdir(old)
    return Result(int(rc), out.getvalue(), err.getvalue())


def run_cmd(*argv, cwd=None, timeout=120) -> Result:
    """``python -m vblock ARGV`` as a separate process."""
    p = subprocess.run(
        [sys.executable, "-m", "vblock", *map(str, argv)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(p.returncode, p.stdout, p.stderr)


def qemu(*argv, cwd=None, check=True):
    return subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, check=check
    )

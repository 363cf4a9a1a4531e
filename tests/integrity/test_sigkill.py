"""A real process killed with SIGKILL at random moments, 50 times: after the automatic repair the
image checks clean and every flushed write reads back (later, unflushed writes may show too)."""

import os
import random
import signal
import subprocess
import sys

import pytest

import vblock
from tests.integrity.crashlib import identify
from tests.integrity.writer import SIZE, plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KILLS = 50


@pytest.mark.timeout(600)
def test_sigkill_50_times(scratch):
    path = str(scratch / "img.qed")
    vblock.create_image(path, "qed", SIZE, cluster_size=65536).close()
    rng = random.Random(7)
    # sector -> set of write ids it may hold; starts as zeros (id 0)
    history = []  # (seed, flushed count, total attempted lower bound)
    for run in range(1, KILLS + 1):
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integrity.writer", path, str(run)],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": ROOT},
        )
        flushed = 0
        wanted = rng.randint(0, 12)  # kill after this many flush reports (0: right after start-up)
        for _ in range(wanted):
            line = proc.stdout.readline()
            if not line:
                break
            flushed = int(line.split()[1])
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        history.append((run, flushed))
        with vblock.open_image(path, format="qed") as img:  # repairs after the kill
            res = img.check()
            assert (res["corruptions"], res["check-errors"]) == (0, 0), (run, res)
            assert res["leaks"] == 0, (run, res)
            _verify(img, history)


def _verify(img, history):
    """Every sector holds one of the newest flushed writes to it (writes of one batch of 8 are in
    flight together, so any of them may land last), or a write that came after them."""
    newest = {}  # sector -> (seed, batch, {wids}) of the newest flushed writes
    later = {}  # sector -> wids written after them (unflushed writes of killed runs)
    for seed, flushed in history:
        for i in range(flushed + 64):  # the writer is never more than a batch past its last flush
            offset, length = plan(seed, i)
            wid = seed * 100_000 + i + 1
            for s in range(offset // 512, (offset + length) // 512):
                if i < flushed:
                    prev = newest.get(s)
                    if prev is not None and prev[:2] == (seed, i // 8):
                        prev[2].add(wid)
                    else:
                        newest[s] = (seed, i // 8, {wid})
                    later.pop(s, None)
                else:
                    later.setdefault(s, set()).add(wid)
    content = img.read(0, SIZE)
    for s, (_, _, wids) in newest.items():
        got = identify(content[s * 512 : (s + 1) * 512], s)
        assert got in wids or got in later.get(s, ()), (s, got, wids)

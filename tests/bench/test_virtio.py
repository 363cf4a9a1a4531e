"""``python -m vblock.bench virtio`` runs and emits the shared row format (speed is not asserted),
and ``pin_threads`` places Python threads but leaves the kernel's io_uring threads alone. Both run
in a subprocess: pinning is process-wide."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest


def _python(code, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    ).stdout


@pytest.mark.timeout(300)
def test_bench_virtio_rows_name_the_placement_and_pair_each_round():
    cpu = min(os.sched_getaffinity(0))
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "vblock.bench",
            "virtio",
            "--duration",
            "0.4",
            "--rounds",
            "2",
            "--cpu",
            str(cpu),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=True,
    ).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert [(r["layer"], r["depth"]) for r in rows] == [
        ("virtio/raw", 1),
        ("virtio/qed", 1),
        ("virtio/raw", 16),
        ("virtio/qed", 16),
        ("virtio/raw poll", 16),
        ("virtio/raw stats", 16),
        ("virtio/mem poll", 16),
        ("virtio/mem stats", 16),
    ]
    assert [r["peer"] for r in rows] == ["block raw"] * 4 + [
        "virtio/raw callback",
        "virtio/raw no stats",
        "virtio/mem callback",
        "virtio/mem no stats",
    ]
    for r in rows:
        assert r["engine"].endswith(f", python on cpu {cpu}")
        assert r["iops"] > 0 and r["peer_iops"] > 0 and r["ratio"] > 0


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2,
    reason="needs two CPUs to tell a pinned thread from a free one",
)
def test_pin_threads_places_python_threads_and_not_the_io_uring_poller(tmp_path):
    cpus = sorted(os.sched_getaffinity(0))
    got = json.loads(
        _python(f"""
        import json, os, threading
        from vblock.bench import pin_threads
        from vblock.hostio import HostFile
        import vblock
        vblock.create_image({str(tmp_path / "img")!r}, "raw", 1 << 20).close()
        img = vblock.open_image({str(tmp_path / "img")!r}, format="raw", cache="none")
        img.write(0, b"x" * 4096)  # the engine and its rings exist now
        pinned = pin_threads({{{cpus[0]}}})
        late = []
        t = threading.Thread(target=lambda: late.append(sorted(os.sched_getaffinity(0))))
        t.start(); t.join()
        tasks = {{}}
        for tid in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{{tid}}/comm") as f:
                comm = f.read().strip()
            tasks[tid] = (comm, sorted(os.sched_getaffinity(int(tid))))
        img.close()
        print(json.dumps({{"pinned": pinned, "late": late[0], "tasks": list(tasks.values()),
                          "engine": img.info().get("engine")}}))
    """)
    )
    python = [aff for comm, aff in got["tasks"] if not comm.startswith("iou-")]
    assert got["pinned"] >= 2 and python and all(aff == [cpus[0]] for aff in python)
    assert got["late"] == [cpus[0]]  # a thread started afterwards inherits the mask
    if got["engine"] != "io_uring":
        pytest.skip(
            "no io_uring here: no kernel poller to leave alone (the Python side was checked)"
        )
    kernel = [aff for comm, aff in got["tasks"] if comm.startswith("iou-")]
    assert kernel and all(aff == cpus for aff in kernel)

"""``convert --in-place``: qcow2 to QED in the same file, on hand-made images (no qemu-img).

The crash-point suite runs each scripted conversion under the fault-injecting host file, crashing
it after every write in turn; each crash is settled twice (unflushed writes dropped, kept or torn
at random). Afterwards the file must be the original qcow2 or a QED, either reading byte-exact;
running the conversion again, or (for a QED) opening it read-write, must leave a QED that reads
byte-exact, checks clean and holds nothing unreferenced. A real SIGKILL of a converting process
is tested the same way.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

import vblock
from tests.files import digest
from vblock.block.inplace import convert_in_place
from vblock.errors import ImageLockedError, UnsupportedError
from vblock.hostio import host_file_opener
from vblock.testing import faults
from vblock.testing.qcow2_image import ZERO, build

KiB = 1 << 10
MiB = 1 << 20
CS = 4 * KiB


def _pattern(seed, n):
    return bytes((seed * 37 + i * 11) & 0xFF for i in range(n))


def _guest(path, fmt=None):
    with vblock.open_image(str(path), format=fmt, read_only=True, cache="writeback") as img:
        return img.format, img.read(0, img.size)


def _qed_clean(path):
    """The QED at ``path`` checks clean and holds nothing past its referenced clusters."""
    with vblock.open_image(str(path), format="qed", read_only=True, no_backing=True) as img:
        r = img.check()
    assert (r["corruptions"], r["leaks"], r["check-errors"]) == (0, 0, 0), r
    with open(path, "rb") as f:
        head = f.read(64)
    assert head[:4] == b"QED\0"
    features = int.from_bytes(head[16:24], "little")
    assert not features & 0x2, "need-check still set"


# -- scripted images ------------------------------------------------------------------------------
def _compressed(d):
    clusters = {
        0: _pattern(1, CS),
        1: ("compressed", _pattern(2, CS)),
        2: ZERO,
        3: ("compressed", bytes(CS)),
        5: _pattern(3, CS),
        9: ("compressed", _pattern(4, CS)),
    }
    (d / "img.qcow2").write_bytes(build(64 * CS, clusters, cluster_bits=12).data)


def _subclusters(d):
    (d / "base.raw").write_bytes(b"\x5a" * (40 * 16 * KiB))
    cs = 16 * KiB
    clusters = {
        0: ("sub", _pattern(5, cs), 0x0000FFFF, 0xFF000000),  # data, backing, zeros
        1: ("sub", _pattern(6, cs), 0xFFFFFFFF, 0),  # all data: stays in place
        2: ("sub", bytes(cs), 0, 0xFFFFFFFF),  # all zeros
        3: ("sub", _pattern(7, cs), 0, 0),  # allocated but all unallocated: backing
        4: _pattern(8, cs),
        6: ZERO,
    }
    (d / "img.qcow2").write_bytes(
        build(
            32 * cs,
            clusters,
            cluster_bits=14,
            extended_l2=True,
            compression_type=1,
            backing="base.raw",
            backing_fmt="raw",
        ).data
    )


def _backing(d):
    (d / "base.raw").write_bytes(b"\x71" * (48 * CS))  # shorter than the image
    clusters = {0: ZERO, 1: _pattern(9, CS), 7: _pattern(10, CS), 8: ZERO, 60: _pattern(11, CS)}
    (d / "img.qcow2").write_bytes(
        build(64 * CS, clusters, cluster_bits=12, backing="base.raw", backing_fmt="raw").data
    )


def _l2_boundaries(d):
    # 4 KiB clusters: a qcow2 L2 table maps 2 MiB, a QED one (table_size 4) 8 MiB
    per = 512
    clusters = {
        per - 1: _pattern(12, CS),
        per: _pattern(13, CS),
        4 * per - 1: _pattern(14, CS),
        4 * per: ("compressed", _pattern(15, CS)),
        9 * per + 3: _pattern(16, CS),
    }
    (d / "img.qcow2").write_bytes(build(20 * MiB, clusters, cluster_bits=12).data)


SCRIPTS = {
    "compressed": _compressed,
    "subclusters": _subclusters,
    "backing": _backing,
    "l2-boundaries": _l2_boundaries,
}


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_conversion_reads_the_same_and_checks_clean(scratch, name):
    SCRIPTS[name](scratch)
    path = scratch / "img.qcow2"
    _, before = _guest(path)
    stats = convert_in_place(str(path))
    fmt, after = _guest(path)
    assert fmt == "qed" and after == before
    _qed_clean(path)
    assert os.path.getsize(path) == stats.final_size


def test_data_clusters_are_not_copied(scratch):
    clusters = {g: _pattern(g, CS) for g in range(40)}
    path = scratch / "img.qcow2"
    path.write_bytes(build(64 * CS, clusters, cluster_bits=12).data)
    stats = convert_in_place(str(path))
    assert stats.clusters_materialized == 0
    # metadata: the tables written twice (appended, then moved down), the header, the moves
    assert stats.bytes_written < (40 + 2 * 2 * 4 + 2) * CS


def test_backing_name_and_raw_format_carry_over(scratch):
    _backing(scratch)
    path = scratch / "img.qcow2"
    convert_in_place(str(path))
    with vblock.open_image(str(path), read_only=True) as img:
        info = img.info()
    assert info["backing-filename"] == "base.raw"
    assert info["backing-filename-format"] == "raw"


def test_small_clusters_are_refused_and_nothing_changes(scratch):
    path = scratch / "img.qcow2"
    path.write_bytes(build(MiB, {0: b"x" * 512}, cluster_bits=11).data)
    before = digest(path)
    with pytest.raises(UnsupportedError, match="cluster size 2048 is below QED's minimum of 4096"):
        convert_in_place(str(path))
    assert digest(path) == before


def test_a_file_held_by_another_open_is_refused(scratch):
    _compressed(scratch)
    path = scratch / "img.qcow2"
    before = digest(path)
    with vblock.open_image(str(path), read_only=True):
        with pytest.raises(ImageLockedError):
            convert_in_place(str(path))
    assert digest(path) == before


# -- crash points ----------------------------------------------------------------------------------
def _writes_of_a_clean_run(directory):
    work = directory / "count"
    shutil.copytree(directory / "orig", work)
    plan = faults.FaultPlan(only=["img.qcow2"])
    with faults.install(plan):
        convert_in_place(str(work / "img.qcow2"), locking="off")
    shutil.rmtree(work)
    return plan.writes


class _KeptOpen(faults.FaultyHostFile):
    """A crashed machine closes nothing: the file stays open for ``settle_crash``."""

    def close(self):
        if not self.plan.crashed:
            super().close()


def _crash_and_recover(directory, crash_after, seed, expected):
    work = directory / f"crash-{crash_after}-{seed}"
    shutil.copytree(directory / "orig", work)
    path = work / "img.qcow2"
    plan = faults.FaultPlan(crash_after=crash_after, only=["img.qcow2"])
    with host_file_opener(lambda p, **kw: _KeptOpen(p, plan, **kw)):
        with pytest.raises(OSError):
            convert_in_place(str(path), locking="off")
    for f in plan.files:
        if f.path.endswith("img.qcow2") and not f.closed:
            f.settle_crash(random.Random(seed))
            faults.FaultyHostFile.close(f)
    fmt, data = _guest(path)
    assert data == expected, (
        f"crash after write {crash_after} (seed {seed}): {fmt} reads differently"
    )
    switched = fmt == "qed"
    if switched and seed % 2 == 0:
        # a read-write open repairs (need-check is set) and so finishes the conversion
        with vblock.open_image(str(path), format="qed", cache="writeback"):
            pass
    else:
        convert_in_place(str(path), locking="off")  # finishes, or converts from the start
    fmt, data = _guest(path)
    assert fmt == "qed" and data == expected
    _qed_clean(path)
    shutil.rmtree(work)
    return switched


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_every_crash_point_leaves_the_qcow2_or_an_identical_qed(scratch, name):
    orig = scratch / "orig"
    orig.mkdir()
    SCRIPTS[name](orig)
    _, expected = _guest(orig / "img.qcow2")
    total = _writes_of_a_clean_run(scratch)
    assert total > 5
    points = recoveries = after_switch = 0
    for k in range(total):
        for seed in (1, 2):
            after_switch += _crash_and_recover(scratch, k, seed, expected)
            recoveries += 1
        points += 1
    print(
        f"\n{name}: {points} crash points, {recoveries} settled crashes recovered "
        f"({after_switch} after the switch)"
    )
    assert points == total and after_switch > 0


# -- a real process, killed ------------------------------------------------------------------------
_CHILD = """
import sys, time
from vblock.block import inplace
from vblock.drivers.qed import reclaim
real = reclaim.Writer.flush
def slow(self):
    real(self)
    time.sleep(0.02)  # widen the window so the kill lands mid-conversion
reclaim.Writer.flush = slow
print("ready", flush=True)
inplace.convert_in_place(sys.argv[1])
print("done", flush=True)
"""


@pytest.mark.parametrize("delay_ms", [5, 40, 90, 150])
def test_sigkill_mid_conversion_leaves_a_readable_image_that_finishes(scratch, delay_ms):
    _l2_boundaries(scratch)
    path = scratch / "img.qcow2"
    _, expected = _guest(path)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert child.stdout.readline().strip() == "ready"
    time.sleep(delay_ms / 1000)  # where the kill lands varies; every landing must be safe
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    fmt, data = _guest(path)
    assert data == expected, f"after SIGKILL the {fmt} image reads differently"
    convert_in_place(str(path))
    fmt, data = _guest(path)
    assert fmt == "qed" and data == expected
    _qed_clean(path)

"""Crash at every write point of scripted QED workloads; after reopen and repair nothing flushed is
lost, nothing reads garbage, check is clean and the file holds no unreferenced clusters."""

import pytest

from crashlib import count_write_points, crash_and_recover

MiB = 1 << 20
SIZE = 8 * MiB  # 4 KiB clusters, table_size 1: each L2 table maps 2 MiB

WORKLOADS = {
    "alloc_across_l2_boundary": [
        ("write", 2 * MiB - 8192, 16384), ("flush",),
        ("write", 4 * MiB - 4096, 8192), ("write", 512, 1024),
    ],
    "new_l2_tables": [
        ("write", 0, 4096), ("write", 2 * MiB, 4096), ("flush",),
        ("write", 4 * MiB + 512, 512), ("write", 6 * MiB, 12288), ("flush",),
        ("write", 6 * MiB + 4096, 4096),
    ],
    "write_zeroes": [
        ("write", 0, 32768), ("flush",),
        ("zeroes", 4096, 8192), ("zeroes", 40960, 8192), ("zeroes", 1024, 1024),
        ("flush",), ("write", 8192, 512),
    ],
    "discard": [
        ("write", 0, 65536), ("flush",), ("discard", 8192, 16384), ("write", 12288, 512), ("flush",),
        ("discard", 0, 4096),
    ],
    "concurrent": [
        ("group", [("write", i * 12288 % (3 * MiB), 8192) for i in range(12)]),
        ("flush",),
        ("group", [("write", 4096, 4096), ("write", 6144, 4096), ("write", 2 * MiB + 512, 1024),
                   ("write", 5 * MiB, 8192), ("zeroes", 16384, 4096)]),
    ],
    "resize": [
        ("write", SIZE - 4096, 4096), ("flush",), ("resize", SIZE + 2 * MiB),
        ("write", SIZE + MiB, 8192), ("flush",), ("write", SIZE + MiB + 4096, 512),
    ],
}

BACKING_WORKLOADS = {
    "backing_copy_on_write": [
        ("write", 1024, 512), ("flush",),
        ("write", 4096 + 2048, 1024), ("write", 2 * MiB + 512, 4096), ("flush",),
        ("write", 3 * MiB, 512),
    ],
}


@pytest.mark.parametrize("name", sorted(WORKLOADS) + sorted(BACKING_WORKLOADS))
def test_every_crash_point_recovers(scratch, name):
    backing = name in BACKING_WORKLOADS
    steps = (BACKING_WORKLOADS if backing else WORKLOADS)[name]
    count_dir = scratch / "count"
    count_dir.mkdir()
    points = count_write_points(str(count_dir), steps, SIZE, backing)
    assert points > 3
    failures = []
    for k in range(points + 1):
        d = scratch / f"crash{k}"
        d.mkdir()
        found = crash_and_recover(str(d), steps, SIZE, crash_after=k, seed=k, backing=backing)
        if found["bad_sectors"] or found["corruptions"] or found["leaks"] or found["oversize"]:
            failures.append((k, found["corruptions"], found["leaks"], found["oversize"], found["bad_sectors"][:3]))
    assert failures == [], f"{name}: {len(failures)} of {points + 1} crash points failed: {failures[:5]}"

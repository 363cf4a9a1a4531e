"""Crash at every write point of scripted QED workloads; after reopen and repair nothing flushed is
lost, nothing reads garbage, check is clean and the file holds no unreferenced clusters."""

import random

import pytest

from tests.integrity.crashlib import count_write_points, crash_and_recover

MiB = 1 << 20
SIZE = 8 * MiB  # 4 KiB clusters, table_size 1: each L2 table maps 2 MiB

WORKLOADS = {
    "alloc_across_l2_boundary": [
        ("write", 2 * MiB - 8192, 16384),
        ("flush",),
        ("write", 4 * MiB - 4096, 8192),
        ("write", 512, 1024),
    ],
    "new_l2_tables": [
        ("write", 0, 4096),
        ("write", 2 * MiB, 4096),
        ("flush",),
        ("write", 4 * MiB + 512, 512),
        ("write", 6 * MiB, 12288),
        ("flush",),
        ("write", 6 * MiB + 4096, 4096),
    ],
    "write_zeroes": [
        ("write", 0, 32768),
        ("flush",),
        ("zeroes", 4096, 8192),
        ("zeroes", 40960, 8192),
        ("zeroes", 1024, 1024),
        ("flush",),
        ("write", 8192, 512),
    ],
    "discard": [
        ("write", 0, 65536),
        ("flush",),
        ("discard", 8192, 16384),
        ("write", 12288, 512),
        ("flush",),
        ("discard", 0, 4096),
    ],
    "concurrent": [
        ("group", [("write", i * 12288 % (3 * MiB), 8192) for i in range(12)]),
        ("flush",),
        (
            "group",
            [
                ("write", 4096, 4096),
                ("write", 6144, 4096),
                ("write", 2 * MiB + 512, 1024),
                ("write", 5 * MiB, 8192),
                ("zeroes", 16384, 4096),
            ],
        ),
    ],
    "resize": [
        ("write", SIZE - 4096, 4096),
        ("flush",),
        ("resize", SIZE + 2 * MiB),
        ("write", SIZE + MiB, 8192),
        ("flush",),
        ("write", SIZE + MiB + 4096, 512),
    ],
}

BACKING_WORKLOADS = {
    "backing_copy_on_write": [
        ("write", 1024, 512),
        ("flush",),
        ("write", 4096 + 2048, 1024),
        ("write", 2 * MiB + 512, 4096),
        ("flush",),
        ("write", 3 * MiB, 512),
    ],
}


def _large_random_workload(seed=2026, n=60):
    """Many small steps over the whole disk: writes, zeroes, discards, flushes, concurrent groups."""
    rng = random.Random(seed)
    steps = []
    for _ in range(n):
        r = rng.random()
        off = rng.randrange(SIZE // 512 - 64) * 512
        length = rng.choice([512, 1024, 4096, 8192, 12288])
        if r < 0.1:
            steps.append(("flush",))
        elif r < 0.2:
            steps.append(("zeroes", off, length))
        elif r < 0.25:
            steps.append(("discard", off, length))
        elif r < 0.4:
            steps.append(
                (
                    "group",
                    [("write", rng.randrange(SIZE // 512 - 64) * 512, 4096) for _ in range(4)],
                )
            )
        else:
            steps.append(("write", off, length))
    return steps


SEEDS_PER_POINT = 2  # different subsets of the unflushed writes kept, and different tears


def _crash_everywhere(scratch, name, steps, backing, points_to_try=None):
    count_dir = scratch / "count"
    count_dir.mkdir()
    points = count_write_points(str(count_dir), steps, SIZE, backing)
    assert points > 3
    tried = (
        range(points + 1)
        if points_to_try is None
        else sorted(random.Random(points).sample(range(points + 1), points_to_try))
    )
    failures = []
    for k in tried:
        for seed in range(SEEDS_PER_POINT):
            d = scratch / f"crash{k}-{seed}"
            d.mkdir()
            found = crash_and_recover(
                str(d), steps, SIZE, crash_after=k, seed=k * 7919 + seed, backing=backing
            )
            if found["bad_sectors"] or found["corruptions"] or found["leaks"] or found["oversize"]:
                failures.append(
                    (
                        k,
                        seed,
                        found["corruptions"],
                        found["leaks"],
                        found["oversize"],
                        found["bad_sectors"][:3],
                    )
                )
    assert failures == [], (
        f"{name}: {len(failures)} of {len(tried)} crash points failed: {failures[:5]}"
    )


@pytest.mark.parametrize("name", sorted(WORKLOADS) + sorted(BACKING_WORKLOADS))
def test_every_crash_point_recovers(scratch, name):
    backing = name in BACKING_WORKLOADS
    _crash_everywhere(scratch, name, (BACKING_WORKLOADS if backing else WORKLOADS)[name], backing)


def test_sampled_crash_points_of_a_large_workload_recover(scratch):
    _crash_everywhere(scratch, "large_random", _large_random_workload(), False, points_to_try=40)

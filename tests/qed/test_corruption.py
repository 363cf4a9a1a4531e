"""Corrupt images (qed.py-style invalidate / duplicate, bad headers, random damage): a clear
ImageError, or a repair that keeps every valid cluster; never another exception."""

import os
import random
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.qed.qed_helpers import (
    MiB,
    create,
    header,
    l1_entry_offset,
    l2_entry_offset,
    pattern,
    poke_header,
    poke_u64,
    read_table,
    reopen,
)
from vblock.errors import ImageError


def _image(scratch, name="c.qed"):
    p = scratch / name
    img = create(p, 8 * MiB, cluster_size=4096, table_size=2)  # 4 MiB per L2 table
    img.write(0, pattern(1, 8192))  # clusters 0, 1 in table 0
    img.write(4 * MiB, pattern(2, 4096))  # table 1
    img.close()
    return p


def _bytes(p):
    with open(p, "rb") as f:
        return f.read()


@pytest.mark.parametrize("value", [1, 4097, 1 << 40])
def test_invalid_l1_entry(scratch, value):
    p = _image(scratch)
    poke_u64(p, l1_entry_offset(p, 1), value)
    before = _bytes(p)
    img = reopen(p, read_only=True)
    assert img.read(0, 8192) == pattern(1, 8192)
    with pytest.raises(ImageError) as info:
        img.read(4 * MiB, 4096)
    assert info.value.field == "l1_table"
    r = img.check()
    assert r["corruptions"] == 1 and r["leaks"] == 3  # the orphaned table (2) + its data (1)
    img.close()
    assert _bytes(p) == before
    img = reopen(p)
    with pytest.raises(ImageError):
        img.write(4 * MiB, pattern(3, 4096))
    assert os.path.getsize(p) == len(before)  # nothing written past the valid range
    r = img.check(repair=True)
    assert r["corruptions-fixed"] == 1 and r["corruptions"] == 0
    assert read_table(p, 4096)[1] == 0
    assert img.read(0, 8192) == pattern(1, 8192)  # valid clusters kept
    assert img.read(4 * MiB, 4096) == bytes(4096)
    img.write(4 * MiB, pattern(3, 4096))
    assert img.read(4 * MiB, 4096) == pattern(3, 4096)
    img.close()


@pytest.mark.parametrize("value", [4097, 1 << 40])
def test_invalid_l2_entry(scratch, value):
    p = _image(scratch)
    poke_u64(p, l2_entry_offset(p, 0, 1), value)
    img = reopen(p, read_only=True)
    assert img.read(0, 4096) == pattern(1, 4096)
    with pytest.raises(ImageError) as info:
        img.read(4096, 4096)
    assert info.value.field == "l2_table"
    r = img.check()
    assert r["corruptions"] == 1 and r["leaks"] == 1  # the cluster the entry used to name
    img.close()
    img = reopen(p)
    r = img.check(repair=True)
    assert r["corruptions"] == 0 and r["corruptions-fixed"] == 1
    assert img.read(0, 4096) == pattern(1, 4096)
    assert img.read(4096, 4096) == bytes(4096)
    assert img.read(4 * MiB, 4096) == pattern(2, 4096)
    img.close()


def test_l2_entry_pointing_at_the_l1_table_is_a_duplicate(scratch):
    p = _image(scratch)
    poke_u64(p, l2_entry_offset(p, 0, 1), 4096)
    img = reopen(p)
    r = img.check(repair=True)
    assert r["corruptions"] == 1 and r["corruptions-fixed"] == 0
    img.close()


def test_duplicate_l1_is_reported_not_fixed(scratch):
    p = _image(scratch)
    l1 = read_table(p, 4096)
    poke_u64(p, l1_entry_offset(p, 1), l1[0])  # qed.py "duplicate l1"
    img = reopen(p)
    assert img.read(4 * MiB, 4096) == pattern(1, 4096)  # table 0 seen through entry 1
    r = img.check(repair=True)
    assert r["corruptions"] >= 1 and r["corruptions-fixed"] == 0
    img.close()


def test_duplicate_l2_is_reported_not_fixed(scratch):
    p = _image(scratch)
    l2 = read_table(p, read_table(p, 4096)[0])
    poke_u64(p, l2_entry_offset(p, 0, 5), l2[0])  # qed.py "duplicate l2"
    img = reopen(p)
    r = img.check()
    assert r["corruptions"] == 1
    assert img.read(5 * 4096, 4096) == pattern(1, 4096)
    img.close()


def test_leaks_are_reclaimed(scratch):
    p = _image(scratch)
    size = os.path.getsize(p)
    # a trailing leak (a crash after extending the file) and an interior one (entry dropped)
    with open(p, "r+b") as f:
        f.truncate(size + 3 * 4096)
    poke_u64(p, l2_entry_offset(p, 0, 1), 0)
    img = reopen(p)
    r = img.check()
    assert r["leaks"] == 4 and r["corruptions"] == 0
    r = img.check(repair=True)
    # the interior one is filled too (reclaim.py), so the file ends one cluster sooner
    assert r["leaks-fixed"] == 4 and r["leaks"] == 0
    assert os.path.getsize(p) == size - 4096
    assert img.read(0, 4096) == pattern(1, 4096) and img.read(4096, 4096) == bytes(4096)
    img.close()


# -- headers (iotest 116 in our words: open must fail cleanly and write nothing) -----------------


@pytest.mark.parametrize(
    "how,field",
    [
        ("truncate512", "l1_table_offset"),
        ("magic", "magic"),
        ("cluster_size", "cluster_size"),
        ("table_size", "table_size"),
        ("header_size", "l1_table_offset"),
        ("l1_table_offset", "l1_table_offset"),
        ("image_size", "image_size"),
        ("features", "features"),
    ],
)
def test_iotest_116_invalid_headers(scratch, how, field):
    p = _image(scratch)
    if how == "truncate512":
        with open(p, "r+b") as f:
            f.truncate(512)
    elif how == "magic":
        poke_header(p, magic=0x12345678)
    elif how == "features":
        poke_header(p, features=0x10)
    elif how == "l1_table_offset":
        poke_header(p, l1_table_offset=2**64 - 1)
    elif how == "image_size":
        poke_header(p, image_size=2**64 - 1)
    else:
        poke_header(p, **{how: 0xFFFFFFFF})
    before = _bytes(p)
    for ro in (True, False):
        with pytest.raises(ImageError) as info:
            reopen(p, read_only=ro)
        assert info.value.field == field
    assert _bytes(p) == before


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(seed=st.integers(0, 2**32 - 1), hits=st.integers(1, 6))
def test_random_metadata_damage(scratch, seed, hits):
    src = scratch / "pristine.qed"
    if not src.exists():
        _image(scratch, "pristine.qed")
    p = scratch / "damaged.qed"
    shutil.copy(src, p)
    rnd = random.Random(seed)
    h = header(src)
    l1 = read_table(src, h.l1_table_offset)
    targets = [(0, 64), (h.l1_table_offset, 32)] + [(o, 64) for o in l1 if o]
    with open(p, "r+b") as f:
        for _ in range(hits):
            base, span = rnd.choice(targets)
            f.seek(base + rnd.randrange(span))
            f.write(bytes([rnd.randrange(256)]))
    length = os.path.getsize(p)
    try:
        img = reopen(p)
    except ImageError:
        return
    try:
        try:
            img.read(0, 8 * MiB if img.size >= 8 * MiB else img.size)
        except ImageError:
            pass
        r = img.check(repair=True)
        assert r["check-errors"] == 0
        for off in (0, 4 * MiB):
            if off + 4096 <= img.size:
                try:
                    img.write(off, pattern(9, 4096))
                    assert img.read(off, 4096) == pattern(9, 4096)
                except ImageError:
                    pass
    finally:
        img.close()
    # nothing was written past what two 4 KiB writes may allocate (two clusters, two tables)
    h = header(p)
    assert os.path.getsize(p) <= length + 2 * h.cluster_size * (1 + h.table_size)


def test_repair_that_moves_a_cluster_forgets_its_old_host_offset(scratch):
    """Compaction moves the last data cluster into an interior leak: reads and writes that knew
    the old host offset (the fast path's memory of mappings) must follow it to the new one."""
    p = scratch / "m.qed"
    img = create(p, 8 * MiB, cluster_size=4096, table_size=2)
    img.write(0, pattern(1, 3 * 4096))  # data clusters, then the L2 table after them
    img.write(3 * 4096, pattern(4, 4096))  # a data cluster after the table: last in the file
    img.close()
    poke_u64(p, l2_entry_offset(p, 0, 0), 0)  # guest cluster 0's data becomes an interior leak
    img = reopen(p)
    for _ in range(2):  # the first read loads the table, the second remembers the mapping
        assert img.read(3 * 4096, 4096) == pattern(4, 4096)
    size = os.path.getsize(p)
    r = img.check(repair=True)
    assert r["leaks-fixed"] == 1 and r["corruptions"] == 0
    assert os.path.getsize(p) == size - 4096  # moved into the leak, the tail cut off
    assert img.read(3 * 4096, 4096) == pattern(4, 4096)
    img.write(3 * 4096, pattern(5, 4096))
    img.close()
    img = reopen(p)
    assert img.read(0, 4 * 4096) == bytes(4096) + pattern(1, 2 * 4096) + pattern(5, 4096)
    assert img.check()["leaks"] == 0
    img.close()

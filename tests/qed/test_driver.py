"""The QED driver through vblock.open_image: layout, I/O, backing files, flags, resize."""

import errno
import os
import threading

import pytest

import vblock
from tests.qed.qed_helpers import KiB, MiB, Recorder, create, header, pattern, read_table, reopen
from vblock.drivers.qed import format as fmt
from vblock.errors import ImageError, QemuCompatibilityWarning, UnsupportedError


def test_create_layout_equals_qemus(scratch):
    p = scratch / "a.qed"
    create(p, 1 << 30).close()
    assert os.path.getsize(p) == 327680  # cluster_size * (1 + table_size)
    h = header(p)
    assert (h.cluster_size, h.table_size, h.header_size, h.l1_table_offset) == (65536, 4, 1, 65536)
    assert h.features == 0 and h.image_size == 1 << 30


def test_first_write_layout_equals_qemus(scratch):
    # reference §10: one 4 KiB write at 8 KiB -> data cluster at 0x50000, L2 at 0x60000, 655360 B
    p = scratch / "a.qed"
    img = create(p, 1 << 30)
    img.write(8 * KiB, pattern(0xAB, 4 * KiB))
    img.close()
    assert os.path.getsize(p) == 655360
    l1 = read_table(p, 65536)
    assert l1[0] == 0x60000
    assert read_table(p, 0x60000)[0] == 0x50000
    with open(p, "rb") as f:
        f.seek(0x50000)
        data = f.read(65536)
    assert data == bytes(8 * KiB) + pattern(0xAB, 4 * KiB) + bytes(52 * KiB)


def test_allocation_order_4k_2_matches_qemu(scratch):
    # reference §10: 4K/2, write 1M 6M -> data 3-770, L2#0 771-772, data 773-1540, L2#1 1541-1542
    p = scratch / "b.qed"
    img = create(p, 64 * MiB, cluster_size=4096, table_size=2)
    img.write(1 * MiB, pattern(0x11, 6 * MiB))
    img.close()
    assert os.path.getsize(p) == 6320128
    l1 = read_table(p, 4096)
    assert l1[0] == 771 * 4096 and l1[1] == 1541 * 4096
    l2a = read_table(p, l1[0])
    assert l2a[256] == 3 * 4096 and l2a[1023] == 770 * 4096
    assert read_table(p, l1[1])[0] == 773 * 4096


def test_read_write_round_trip_and_unallocated_zeros(scratch):
    img = create(scratch / "c.qed", 8 * MiB, cluster_size=4096, table_size=1)
    img.write(4096 - 512, pattern(1, 1024))  # crosses a cluster boundary
    img.write(2 * MiB - 512, pattern(2, 1024))  # crosses an L2 boundary
    assert img.read(0, 4096 - 512) == bytes(4096 - 512)
    assert img.read(4096 - 512, 1024) == pattern(1, 1024)
    assert img.read(2 * MiB - 512, 1024) == pattern(2, 1024)
    assert img.read(3 * MiB, 4096) == bytes(4096)
    img.close()
    img = reopen(scratch / "c.qed")
    assert img.read(4096 - 512, 1024) == pattern(1, 1024)
    assert img.read(2 * MiB - 512, 1024) == pattern(2, 1024)
    assert img.check()["corruptions"] == 0 and img.check()["leaks"] == 0
    img.close()


def test_table_size_one_opens(scratch):
    p = scratch / "ts1.qed"
    with pytest.warns(QemuCompatibilityWarning, match="table_size 1"):
        vblock.create_image(str(p), "qed", 1 * MiB, cluster_size=4096, table_size=1).close()
    img = reopen(p)
    img.write(0, pattern(5, 4096))
    assert img.read(0, 4096) == pattern(5, 4096)
    img.close()


def test_table_size_8_warns(scratch):
    with pytest.warns(QemuCompatibilityWarning, match="table_size >= 8"):
        vblock.create_image(
            str(scratch / "ts8.qed"), "qed", 1 * MiB, cluster_size=4096, table_size=8
        ).close()


def test_multi_run_read_merges_contiguous_clusters(scratch):
    img = create(scratch / "m.qed", 4 * MiB, cluster_size=4096, table_size=1)
    img.write(0, pattern(7, 64 * KiB))
    runs = img.block_status(0, 64 * KiB)
    assert len(runs) == 1 and runs[0].kind == "data"
    assert img.read(0, 64 * KiB) == pattern(7, 64 * KiB)
    img.close()


# -- backing files ---------------------------------------------------------------------------


def _raw_backing(path, size, byte):
    with open(path, "wb") as f:
        f.write(bytes([byte]) * size)


def test_backing_raw_reads_and_cow(scratch):
    # reference §8: raw backing of 100 KiB of 0x5a under a 1 GiB overlay
    _raw_backing(scratch / "base.raw", 100 * KiB, 0x5A)
    img = create(scratch / "o.qed", 1 << 30, backing_file="base.raw", backing_fmt="raw")
    assert header(scratch / "o.qed").features == 0x05
    img.write(8 * KiB, pattern(0xEE, 4 * KiB))
    img.write(64 * KiB, pattern(0xDD, 4 * KiB))
    assert img.read(0, 8 * KiB) == pattern(0x5A, 8 * KiB)
    assert img.read(12 * KiB, 52 * KiB) == pattern(0x5A, 52 * KiB)
    assert img.read(68 * KiB, 32 * KiB) == pattern(0x5A, 32 * KiB)
    assert img.read(100 * KiB, 28 * KiB) == bytes(28 * KiB)
    assert img.read(200 * KiB, 4 * KiB) == bytes(4 * KiB)  # past the backing file's end
    # Unlike QEMU, NEED_CHECK is set with a backing file too while allocations may be in flight:
    # a crash can leak clusters either way, and the repair at the next open gives them back.
    assert header(scratch / "o.qed").need_check
    img.close()
    assert header(scratch / "o.qed").features == 0x05
    os.unlink(scratch / "base.raw")
    _raw_backing(scratch / "base.raw", 100 * KiB, 0x00)
    img = reopen(scratch / "o.qed")
    # copied-up clusters no longer depend on the backing file
    assert img.read(0, 64 * KiB) == pattern(0x5A, 8 * KiB) + pattern(0xEE, 4 * KiB) + pattern(
        0x5A, 52 * KiB
    )
    assert img.read(64 * KiB, 8 * KiB) == pattern(0xDD, 4 * KiB) + pattern(0x5A, 4 * KiB)
    assert img.read(100 * KiB, 4 * KiB) == bytes(4 * KiB)
    img.close()


def test_backing_qed_probed_and_relative(scratch):
    sub = scratch / "d"
    sub.mkdir()
    base = create(sub / "base.qed", 4 * MiB, cluster_size=4096, table_size=2)
    base.write(0, pattern(0x42, 1 * MiB))
    base.close()
    top = create(sub / "top.qed", 4 * MiB, cluster_size=4096, table_size=2, backing_file="base.qed")
    assert header(sub / "top.qed").features == fmt.F_BACKING_FILE
    top.write(4096, pattern(0x43, 4096))
    assert top.read(0, 4096) == pattern(0x42, 4096)
    assert top.read(4096, 4096) == pattern(0x43, 4096)
    assert top.driver.backing.format == "qed"
    top.close()
    cwd = os.getcwd()
    try:
        os.chdir(scratch)  # the relative name resolves against the image's directory
        img = reopen("d/top.qed", read_only=True)
        assert img.read(8192, 4096) == pattern(0x42, 4096)
        img.close()
    finally:
        os.chdir(cwd)


def test_backing_chain_of_three(scratch):
    _raw_backing(scratch / "l0.raw", 1 * MiB, 1)
    a = create(
        scratch / "l1.qed",
        1 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="l0.raw",
        backing_fmt="raw",
    )
    a.write(4096, pattern(2, 4096))
    a.close()
    b = create(
        scratch / "l2.qed",
        1 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="l1.qed",
        backing_fmt="qed",
    )
    b.write(8192, pattern(3, 4096))
    assert b.read(0, 12288) == pattern(1, 4096) + pattern(2, 4096) + pattern(3, 4096)
    runs = b.block_status(0, 12288)
    assert [(r.kind, r.depth) for r in runs] == [("data", 2), ("data", 1), ("data", 0)]
    b.close()


def _hand_made(path, backing, backing_fmt=None):
    h, head = fmt.create_header(1 * MiB, 4096, 2, backing, backing_fmt)
    with open(path, "wb") as f:
        f.write(head.ljust(4096 * 3, b"\0"))


def test_backing_loop_is_an_image_error(scratch):
    _hand_made(scratch / "x.qed", "y.qed")
    _hand_made(scratch / "y.qed", "x.qed")
    with pytest.raises(ImageError) as info:
        reopen(scratch / "x.qed")
    assert info.value.field == "backing_file" and "loop" in str(info.value)
    _hand_made(scratch / "self.qed", "self.qed")
    with pytest.raises(ImageError):
        reopen(scratch / "self.qed", read_only=True)


def test_missing_backing_file_is_an_image_error(scratch):
    _hand_made(scratch / "z.qed", "nowhere.raw", "raw")
    with pytest.raises(ImageError) as info:
        reopen(scratch / "z.qed")
    assert info.value.field == "backing_file"


def test_change_backing(scratch):
    _raw_backing(scratch / "b1.raw", 64 * KiB, 9)
    img = create(scratch / "cb.qed", 1 * MiB, cluster_size=4096, table_size=2)
    assert img.read(0, 4096) == bytes(4096)
    img.change_backing("b1.raw", "raw")
    assert header(scratch / "cb.qed").features == 0x05
    assert img.read(0, 4096) == pattern(9, 4096)
    img.change_backing(None)
    assert header(scratch / "cb.qed").features & 0x05 == 0
    assert img.read(0, 4096) == bytes(4096)
    img.close()


# -- zero clusters, write_zeroes, discard ----------------------------------------------------------


def test_write_zeroes_aligned_makes_zero_clusters_hiding_backing(scratch):
    _raw_backing(scratch / "zb.raw", 1 * MiB, 0x77)
    img = create(
        scratch / "z.qed",
        1 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="zb.raw",
        backing_fmt="raw",
    )
    img.write_zeroes(8192, 8192)
    assert img.read(8192, 8192) == bytes(8192)
    assert img.read(0, 8192) == pattern(0x77, 8192)
    runs = img.block_status(8192, 8192)
    assert [(r.kind, r.depth) for r in runs] == [("zero", 0)]
    l1 = read_table(scratch / "z.qed", 4096)
    l2 = read_table(scratch / "z.qed", l1[0])
    assert list(l2[2:4]) == [1, 1]
    # writing into a zero cluster zero-fills the rest, the backing file is not consulted
    img.write(8192 + 512, pattern(5, 512))
    assert img.read(8192, 4096) == bytes(512) + pattern(5, 512) + bytes(3072)
    img.close()


def test_write_zeroes_unaligned_head_and_tail_are_data(scratch):
    _raw_backing(scratch / "zb.raw", 1 * MiB, 0x77)
    img = create(
        scratch / "z.qed",
        1 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="zb.raw",
        backing_fmt="raw",
    )
    img.write_zeroes(4096 + 512, 3 * 4096)
    assert img.read(4096, 512) == pattern(0x77, 512)
    assert img.read(4096 + 512, 3 * 4096) == bytes(3 * 4096)
    assert img.read(4 * 4096 + 512, 3584) == pattern(0x77, 3584)
    kinds = [r.kind for r in img.driver.block_status(4096, 4 * 4096)]
    assert kinds == ["data", "zero", "data"]
    img.close()


def test_write_zeroes_over_allocated_keeps_mapping(scratch):
    img = create(scratch / "za.qed", 1 * MiB, cluster_size=4096, table_size=2)
    img.write(0, pattern(3, 16384))
    before = img.driver.block_status(0, 16384)
    img.write_zeroes(4096, 8192)
    assert img.read(0, 16384) == pattern(3, 4096) + bytes(8192) + pattern(3, 4096)
    assert img.driver.block_status(0, 16384) == before
    img.close()


def test_discard_punches_holes_and_keeps_mapping(scratch):
    p = scratch / "d.qed"
    img = create(p, 4 * MiB, cluster_size=4096, table_size=2)
    img.write(0, pattern(4, 1 * MiB))
    img.flush()
    blocks_before = os.stat(p).st_blocks
    img.discard(4096, 512 * KiB)
    assert os.stat(p).st_blocks < blocks_before
    assert img.read(0, 4096) == pattern(4, 4096)
    assert img.read(4096, 512 * KiB) == bytes(512 * KiB)
    assert img.driver.block_status(0, 1 * MiB)[0].kind == "data"
    r = img.check()
    assert (r["corruptions"], r["leaks"]) == (0, 0)
    img.close()


# -- resize ------------------------------------------------------------------------------------


def test_resize_grow_only(scratch):
    p = scratch / "r.qed"
    img = create(p, 128 * MiB)
    img.write(0, pattern(1, 4096))
    img.resize(384 * MiB)
    assert header(p).image_size == 384 * MiB
    assert img.read(0, 4096) == pattern(1, 4096)
    assert img.read(300 * MiB, 4096) == bytes(4096)
    with pytest.raises(UnsupportedError):
        img.resize(64 * MiB)
    img.close()
    assert reopen(p).size == 384 * MiB


# -- feature bits -------------------------------------------------------------------------------


def test_need_check_set_flushed_before_first_allocation_and_cleared_on_close(scratch):
    p = scratch / "n.qed"
    img = create(p, 1 * MiB, cluster_size=4096, table_size=2)
    rec = Recorder(img)
    img.write(0, pattern(1, 4096))
    assert header(p).need_check
    names = rec.names
    assert names.index("HEADER_UPDATE") < names.index("DATA_WRITE")
    assert names == ["HEADER_UPDATE", "DATA_WRITE", "L2_ALLOC", "L2_FLUSH", "L1_UPDATE"]
    img.close()
    assert not header(p).need_check


def test_durable_order_with_backing(scratch):
    _raw_backing(scratch / "ob.raw", 64 * KiB, 1)
    img = create(
        scratch / "o.qed",
        1 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="ob.raw",
        backing_fmt="raw",
    )
    rec = Recorder(img)
    img.write(0, pattern(2, 512))
    # need-check first (set with a backing file too, unlike QEMU), then QEMU's order
    assert rec.names == [
        "HEADER_UPDATE",
        "DATA_WRITE",
        "DATA_FLUSH",
        "L2_ALLOC",
        "L2_FLUSH",
        "L1_UPDATE",
    ]
    rec.names.clear()
    img.write(8192, pattern(2, 512))  # same table: slice update, no new table
    assert rec.names == ["DATA_WRITE", "DATA_FLUSH", "L2_UPDATE"]
    img.close()


def test_need_check_cleared_after_idle_period(scratch):
    p = scratch / "idle.qed"
    create(p, 1 * MiB, cluster_size=4096, table_size=2).close()
    img = reopen(p, need_check_timeout=0.01)
    cleared = threading.Event()
    img.driver.events = lambda name: cleared.set() if name == "NEED_CHECK_CLEARED" else None
    img.write(0, pattern(1, 4096))
    assert cleared.wait(30)
    assert not header(p).need_check
    cleared.clear()
    img.write(8192, pattern(1, 4096))  # the next allocation sets it again
    assert cleared.wait(30)
    assert img.read(8192, 4096) == pattern(1, 4096)
    img.close()


def test_open_with_need_check_repairs_read_write_only(scratch):
    p = scratch / "nc.qed"
    img = create(p, 1 * MiB, cluster_size=4096, table_size=2)
    img.write(0, pattern(1, 4096))
    img.close()
    # corrupt: an L2 entry past the end of file, and mark the image dirty
    l1 = read_table(p, 4096)
    from tests.qed.qed_helpers import poke_header, poke_u64

    poke_u64(p, l1[0] + 8 * 5, 1 << 30)
    poke_header(p, features=fmt.F_NEED_CHECK)
    ro = reopen(p, read_only=True)
    assert ro.check()["corruptions"] == 1
    ro.close()
    assert header(p).need_check  # a read-only open changes nothing
    img = reopen(p)
    assert not header(p).need_check
    assert read_table(p, l1[0])[5] == 0
    assert img.read(0, 4096) == pattern(1, 4096)
    assert img.check()["corruptions"] == 0
    img.close()


def test_autoclear_cleared_compat_kept(scratch):
    p = scratch / "f.qed"
    create(p, 1 * MiB).close()
    from tests.qed.qed_helpers import poke_header

    poke_header(p, compat_features=0x10, autoclear_features=0x20)
    reopen(p, read_only=True).close()
    assert header(p).autoclear_features == 0x20
    reopen(p).close()
    h = header(p)
    assert h.compat_features == 0x10 and h.autoclear_features == 0


def test_info(scratch):
    img = create(scratch / "i.qed", 1 * MiB, cluster_size=4096, table_size=2)
    info = img.info()
    assert info["cluster-size"] == 4096 and info["format"] == "qed"
    assert info["dirty-flag"] is False
    img.close()


@pytest.mark.parametrize(
    "step, length", [("allocating", 4096), ("in place", 4096), ("in place", 8192)]
)
def test_fua_write_survives_a_power_cut_right_after_it(scratch, step, length):
    """A FUA write is durable when it completes: the host then loses every write not yet
    flushed (none may be kept), and the data still reads back after repair. Covers the three
    write paths (allocation, a rewrite inside one cached cluster, a rewrite across contiguous
    clusters); fails when any of them skips the data flush or the flush of the table update."""
    import random

    from vblock.testing import faults

    p = scratch / "fua.qed"
    img = create(p, 1 * MiB, cluster_size=4096, table_size=2)
    if step == "in place":
        img.write(0, pattern(1, length))
        img.flush()
    img.close()
    plan = faults.FaultPlan(only=["fua.qed"])
    with faults.install(plan):
        img = reopen(p)
        if step == "in place":
            assert img.read(0, length) == pattern(1, length)  # the table is cached now
        img.write(0, pattern(2, length), fua=True)
        plan.crashed = True  # the power goes: every later host write fails
        for f in plan.files:
            f.settle_crash(random.Random(0), keep_probability=0.0)
    # The crashed image object is abandoned, as a killed process would leave it; its image locks
    # go as a killed process's would.
    img.lock.close()
    with reopen(p) as img:
        assert img.read(0, length) == pattern(2, length)
        assert img.check()["corruptions"] == 0


def test_cache_stays_bounded_and_loads_each_table_once_per_miss(scratch):
    p = scratch / "wide.qed"
    img = create(p, 64 * MiB, cluster_size=4096, table_size=1)  # 32 L2 tables of 2 MiB
    for region in range(32):
        img.write(region * 2 * MiB, pattern(region + 1, 4096))
    img.close()
    img = reopen(p, read_only=True, l2_cache_size=4)
    for region in range(32):
        assert img.read(region * 2 * MiB, 4096) == pattern(region + 1, 4096)
    assert img.driver.cache.loads == 32 and len(img.driver.cache) == 4
    for region in range(28, 32):  # the four most recent are cached: no load
        img.read(region * 2 * MiB, 4096)
    assert img.driver.cache.loads == 32
    img.read(0, 4096)  # evicted long ago
    assert img.driver.cache.loads == 33 and len(img.driver.cache) == 4
    img.close()


def test_the_growth_reserve_is_allocated_and_trimmed_at_close(scratch):
    """New clusters go into blocks allocated ahead (a step of 16 MiB here), not into a hole; a
    clean close cuts the reserve off again."""
    path = str(scratch / "g.qed")
    img = create(path, 64 * MiB)
    img.write(0, pattern(1, 64 * KiB))
    drv = img.driver
    assert drv.growth.file_length - drv.state.file_size >= 15 * MiB
    assert os.stat(path).st_blocks * 512 >= 15 * MiB  # allocated, not sparse (a hole: < 1 MiB)
    img.close()
    assert os.path.getsize(path) == drv.state.file_size
    img = reopen(path)
    assert img.read(0, 64 * KiB) == pattern(1, 64 * KiB)
    img.close()


def test_growth_falls_back_to_a_hole_where_allocation_is_refused(scratch, monkeypatch):
    path = str(scratch / "h.qed")
    img = create(path, 64 * MiB)
    drv = img.driver
    calls = []

    def refuse(offset, length):
        calls.append((offset, length))
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(drv.f, "allocate", refuse)
    img.write(0, pattern(2, 64 * KiB))
    img.write(32 * MiB, pattern(3, 64 * KiB))  # beyond the first step
    assert len(calls) == 1 and not drv.growth.preallocate  # asked once, then truncates only
    assert drv.growth.file_length > drv.state.file_size
    assert img.read(0, 64 * KiB) == pattern(2, 64 * KiB)
    assert img.read(32 * MiB, 64 * KiB) == pattern(3, 64 * KiB)
    img.close()

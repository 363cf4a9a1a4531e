"""QEMU's qemu-iotests cases that concern QED, rewritten in our own words against vblock.
(116, invalid headers, lives in test_corruption.py; QEMU-side checks in tests/interop.)"""

import pytest

from tests.qed.qed_helpers import KiB, MiB, create, header, pattern, reopen


def _raw(path, data):
    with open(path, "wb") as f:
        f.write(data)


def test_004_io_beyond_the_end_fails_and_the_last_sector_works(scratch):
    img = create(scratch / "a.qed", 128 * MiB)
    last = 128 * MiB - 512
    img.write(last, pattern(1, 512))
    assert img.read(last, 512) == pattern(1, 512)
    for bad in ((128 * MiB, 512), (last, 1024), (128 * MiB + 512, 512)):
        with pytest.raises(ValueError):
            img.write(bad[0], bytes(bad[1]))
        with pytest.raises(ValueError):
            img.read(*bad)
    img.close()


def test_017_backing_reads_after_overlay_writes(scratch):
    base = create(scratch / "base.qed", 4 * MiB)
    base.write(0, pattern(0xA, 1 * MiB))
    base.write(2 * MiB, pattern(0xB, 1 * MiB))
    base.close()
    top = create(scratch / "top.qed", 4 * MiB, backing_file="base.qed", backing_fmt="qed")
    top.write(512 * KiB, pattern(0xC, 2 * MiB))
    assert top.read(0, 512 * KiB) == pattern(0xA, 512 * KiB)
    assert top.read(512 * KiB, 2 * MiB) == pattern(0xC, 2 * MiB)
    assert top.read(5 * 512 * KiB, 512 * KiB) == pattern(0xB, 512 * KiB)
    assert top.read(3 * MiB, 1 * MiB) == bytes(1 * MiB)
    top.close()


def test_025_resize_keeps_data_and_new_space_reads_zero(scratch):
    img = create(scratch / "r.qed", 128 * MiB)
    img.write(127 * MiB, pattern(5, 1 * MiB))
    img.resize(384 * MiB)
    img.close()
    img = reopen(scratch / "r.qed")
    assert img.size == 384 * MiB
    assert img.read(127 * MiB, 1 * MiB) == pattern(5, 1 * MiB)
    assert img.read(128 * MiB, 1 * MiB) == bytes(1 * MiB)
    img.write(383 * MiB, pattern(6, 4096))
    assert img.read(383 * MiB, 4096) == pattern(6, 4096)
    img.close()


def test_027_sub_cluster_write_zero_fills_the_cluster(scratch):
    img = create(scratch / "s.qed", 16 * MiB)
    img.write(4096, pattern(7, 512))
    runs = img.driver.block_status(0, 65536)
    assert [(r.kind, r.length) for r in runs] == [("data", 65536)]
    assert img.read(0, 65536) == bytes(4096) + pattern(7, 512) + bytes(65536 - 4608)
    img.close()


def test_028_backing_file_smaller_than_the_image(scratch):
    _raw(scratch / "small.raw", pattern(0x42, 100 * KiB + 512))
    img = create(
        scratch / "big.qed",
        1 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="small.raw",
        backing_fmt="raw",
    )
    end = 100 * KiB + 512
    assert img.read(end - 4096, 8192) == pattern(0x42, 4096) + bytes(4096)
    cl = end // 4096 * 4096  # the cluster holding the backing file's end
    img.write(cl + 1024, pattern(0x43, 512))  # COW across the backing file's EOF
    expect = pattern(0x42, end - cl) + bytes(1024 - (end - cl)) + pattern(0x43, 512)
    assert img.read(cl, 4096) == expect + bytes(4096 - len(expect))
    assert img.read(512 * KiB, 4096) == bytes(4096)
    img.close()


def test_034_write_zeroes_with_backing(scratch):
    _raw(scratch / "b.raw", pattern(0x11, 1 * MiB))
    img = create(
        scratch / "z.qed",
        1 * MiB,
        cluster_size=4096,
        table_size=2,
        backing_file="b.raw",
        backing_fmt="raw",
    )
    img.write_zeroes(0, 8192)  # aligned: zero clusters
    img.write_zeroes(8192 + 512, 1024)  # unaligned: data, backing kept around it
    assert [r.kind for r in img.driver.block_status(0, 12288)] == ["zero", "data"]
    assert img.read(8192, 4096) == pattern(0x11, 512) + bytes(1024) + pattern(0x11, 2560)
    img.write(4096, pattern(0x22, 512))  # overwrite part of a zero cluster
    assert img.read(4096, 4096) == pattern(0x22, 512) + bytes(3584)
    assert img.read(0, 4096) == bytes(4096)
    img.close()


@pytest.mark.parametrize("start_sector,nsectors", [(1, 1), (3, 4), (7, 2), (5, 12), (0, 16)])
def test_037_cow_from_backing_at_512_byte_granularity(scratch, start_sector, nsectors):
    base = bytes((i // 512) & 0xFF for i in range(64 * KiB))
    _raw(scratch / "b.raw", base)
    img = create(
        scratch / "c.qed",
        64 * KiB,
        cluster_size=4096,
        table_size=2,
        backing_file="b.raw",
        backing_fmt="raw",
    )
    off, n = start_sector * 512, nsectors * 512
    img.write(off, pattern(0xFF, n))
    expect = bytearray(base)
    expect[off : off + n] = pattern(0xFF, n)
    assert img.read(0, 64 * KiB) == bytes(expect)
    img.close()
    img = reopen(scratch / "c.qed", read_only=True)
    assert img.read(0, 64 * KiB) == bytes(expect)
    img.close()


@pytest.mark.parametrize("warm", [False, True], ids=["pool", "inline"])
def test_038_concurrent_cow_into_one_cluster(scratch, warm):
    base = bytes((i // 512) & 0xFF for i in range(512 * KiB))
    _raw(scratch / "b.raw", base)
    img = create(
        scratch / "c.qed",
        512 * KiB,
        cluster_size=65536,
        table_size=2,
        backing_file="b.raw",
        backing_fmt="raw",
    )
    expect = bytearray(base)
    if warm:  # need-check set and table cached: the batch below allocates without the pool
        img.write(256 * KiB, pattern(0x7F, 4096))
        expect[256 * KiB : 260 * KiB] = pattern(0x7F, 4096)
    futs = []
    bufs = []
    for i in range(0, 256 * KiB, 8 * KiB):  # every other 4 KiB, all clusters at once
        buf = bytearray(pattern(0x80 | (i // 8192), 4096))
        bufs.append(buf)
        futs.append(img.submit_write(i, buf))
        expect[i : i + 4096] = buf
    for f in futs:
        f.result()
    assert img.read(0, 512 * KiB) == bytes(expect)
    r = img.check()
    assert (r["corruptions"], r["leaks"]) == (0, 0)
    img.close()


def test_042_zero_size_images(scratch):
    img = create(scratch / "zero.qed", 0)
    assert img.size == 0
    assert img.read(0, 0) == b""
    assert img.check()["corruptions"] == 0
    img.resize(1 * MiB)
    img.write(0, pattern(1, 512))
    img.close()
    assert reopen(scratch / "zero.qed").read(0, 512) == pattern(1, 512)


@pytest.mark.parametrize("size,want", [(1024, 1024), (1234, 1536), (0, 0), (513, 1024)])
def test_104_sizes_round_up_to_512(scratch, size, want):
    img = create(scratch / "s.qed", size)
    assert img.size == want and header(scratch / "s.qed").image_size == want
    img.close()

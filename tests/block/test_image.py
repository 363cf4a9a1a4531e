"""Image behaviour through each driver: the API, bouncing, cache modes, metadata."""

import errno
import os

import pytest

import vblock
from tests.block.block_helpers import CONFIGS, make_image
from vblock.block import DATA, ZERO
from vblock.block.bounce import address_of, aligned_buffer
from vblock.future import Future

SIZE = 256 * 1024


@pytest.fixture(params=[c[1] for c in CONFIGS], ids=[c[0] for c in CONFIGS])
def image(request, scratch):
    img = make_image(scratch, "img.raw", SIZE, request.param)
    yield img
    img.close()


def test_sync_round_trip_at_odd_offsets(image):
    data = os.urandom(5000)
    image.write(777, data)
    assert image.read(777, 5000) == data
    assert image.read(0, 777) == bytes(777)
    assert image.read(777 + 5000, 100) == bytes(100)


def test_submit_returns_futures_with_byte_counts(image):
    data = bytearray(os.urandom(8192))
    w = image.submit_write(4096, [memoryview(data)[:100], memoryview(data)[100:]])
    assert isinstance(w, Future)
    assert w.result(timeout=10) == 8192
    out = [bytearray(3), bytearray(8000), bytearray(189)]
    r = image.submit_read(4096, out)
    assert r.result(timeout=10) == 8192
    assert b"".join(out) == data


def test_aligned_buffers_round_trip(image):
    buf = aligned_buffer(16384)
    buf[:] = os.urandom(16384)
    assert image.submit_write(65536, [buf[:4096], buf[4096:]]).result() == 16384
    back = aligned_buffer(16384)
    assert image.submit_read(65536, [back]).result() == 16384
    assert bytes(back) == bytes(buf)
    assert address_of(back) % 4096 == 0


def test_buffers_of_other_formats_are_flattened(image):
    import array

    data = array.array("I", range(256))  # 1 KiB of 4-byte items
    image.write(1000, data)
    assert image.read(1000, 1024) == data.tobytes()


def test_zero_length_requests_complete(image):
    assert image.submit_read(SIZE, []).result() == 0
    assert image.submit_write(SIZE, b"").result() == 0
    image.write_zeroes(SIZE, 0)
    image.discard(0, 0)


def test_write_zeroes_unaligned_keeps_neighbours(image):
    image.write(0, b"\xaa" * 12288)
    image.write_zeroes(1001, 5000)
    got = image.read(0, 12288)
    assert got == b"\xaa" * 1001 + bytes(5000) + b"\xaa" * (12288 - 6001)


def test_write_zeroes_may_unmap_reads_zeros(image):
    image.write(0, b"\x55" * 65536)
    image.write_zeroes(8192, 32768, may_unmap=True)
    assert image.read(0, 65536) == b"\x55" * 8192 + bytes(32768) + b"\x55" * 24576


def test_discard_then_read_zeros(image):
    image.write(0, b"\x11" * 65536)
    image.discard(4096, 8192)
    assert image.read(4096, 8192) == bytes(8192)
    assert image.read(0, 4096) == b"\x11" * 4096


def test_flush_and_fua(image):
    image.write(0, b"z" * 512, fua=True)
    image.flush()
    assert image.read(0, 512) == b"z" * 512


def test_resize_grows_with_zeros_and_shrinks(image):
    image.write(SIZE - 512, b"\x77" * 512)
    image.resize(SIZE * 2)
    assert image.size == SIZE * 2
    assert image.read(SIZE - 512, 1024) == b"\x77" * 512 + bytes(512)
    image.resize(SIZE // 2)
    assert image.size == SIZE // 2
    with pytest.raises(ValueError):
        image.read(SIZE // 2, 1)


def test_info_has_the_common_fields(image):
    info = image.info()
    assert info["format"] == image.format
    assert info["virtual-size"] == SIZE
    assert info["read-only"] is False


def test_context_manager_closes(scratch):
    with make_image(scratch, "cm.raw", 4096, {"format": "raw"}) as img:
        img.write(0, b"a" * 10)
    assert img.closed


def test_raw_block_status_reports_holes(scratch):
    path = os.path.join(scratch, "sparse.raw")
    with open(path, "wb") as f:
        f.truncate(1 << 20)
    with vblock.open_image(path, format="raw") as img:
        img.write(256 * 1024, b"\x01" * 65536)
        runs = img.block_status(0, 1 << 20)
        assert sum(r.length for r in runs) == 1 << 20
        data = [r for r in runs if r.kind == DATA]
        assert data and all(r.host_offset == r.offset for r in data)
        covered = [(r.offset, r.offset + r.length) for r in data]
        assert any(a <= 256 * 1024 and 320 * 1024 <= b for a, b in covered)
        assert runs[0].kind == ZERO and runs[0].offset == 0
        img.discard(0, 1 << 20)
        assert img.block_status(0, 1 << 20) == [vblock.block.Run(0, 1 << 20, ZERO)]
        assert img.info()["discard"] == "punch-hole"


def test_raw_discard_ignore_keeps_data(scratch):
    path = os.path.join(scratch, "keep.raw")
    with open(path, "wb") as f:
        f.write(b"\x42" * 65536)
    with vblock.open_image(path, format="raw", discard="ignore") as img:
        img.discard(0, 65536)
        assert img.read(0, 65536) == b"\x42" * 65536
        assert img.info()["discard"] == "ignore"


def test_raw_cache_none_is_direct_and_writeback_is_not(scratch):
    path = os.path.join(scratch, "c.raw")
    with open(path, "wb") as f:
        f.truncate(65536)
    with vblock.open_image(path, format="raw", cache="none") as img:
        assert img.info()["direct"] is True
        assert img.limits.request_alignment > 1
    for cache in ("writeback", "unsafe"):
        with vblock.open_image(path, format="raw", cache=cache) as img:
            assert img.info()["direct"] is False
            assert img.limits.request_alignment == 1


def test_raw_unsafe_flush_does_not_reach_the_host(scratch, monkeypatch):
    path = os.path.join(scratch, "u.raw")
    with open(path, "wb") as f:
        f.truncate(65536)
    with vblock.open_image(path, format="raw", cache="unsafe") as img:
        hostfile = img.driver.hostfile

        def no_flush(*a):
            raise AssertionError("unsafe must not flush")

        monkeypatch.setattr(hostfile, "submit_flush", no_flush)
        monkeypatch.setattr(hostfile, "flush", no_flush)
        img.write(0, b"q" * 4096, fua=True)
        img.flush()
        assert img.read(0, 4096) == b"q" * 4096


def test_raw_unaligned_file_size_falls_back_to_page_cache(scratch):
    path = os.path.join(scratch, "odd.raw")
    with open(path, "wb") as f:
        f.write(b"\x09" * 1000)
    with vblock.open_image(path, format="raw", cache="none") as img:
        assert img.size == 1000
        assert img.info()["direct"] is False
        img.write(999, b"\x01")
        assert img.read(990, 10) == b"\x09" * 9 + b"\x01"
    assert os.path.getsize(path) == 1000


def test_create_image_raw_and_reopen(scratch):
    path = os.path.join(scratch, "made.raw")
    with vblock.create_image(path, "raw", 1 << 20) as img:
        assert img.format == "raw" and img.size == 1 << 20
        img.write(12345, b"hello")
    assert os.path.getsize(path) == 1 << 20
    with vblock.open_image(path, format="raw", read_only=True) as img:
        assert img.read(12345, 5) == b"hello"


def test_create_image_raw_full_preallocation(scratch):
    path = os.path.join(scratch, "full.raw")
    with vblock.create_image(path, "raw", 1 << 20, preallocation="full") as img:
        assert img.block_status(0, 1 << 20)[0].kind == DATA


def test_memory_without_path_is_private(scratch):
    a = vblock.open_image(None, format="memory", size=4096)
    b = vblock.open_image("", format="memory", size=4096)
    a.write(0, b"only a")
    assert b.read(0, 6) == bytes(6)
    assert a.info()["format"] == "memory"


def test_memory_named_images_share_bytes():
    from vblock.drivers.memory.driver import forget

    try:
        with vblock.create_image("ram:shared", "memory", 8192) as a:
            a.write(100, b"shared")
            with vblock.open_image("ram:shared", format="memory") as b:
                assert b.read(100, 6) == b"shared"
    finally:
        forget("ram:shared")
    with pytest.raises(FileNotFoundError):
        vblock.open_image("ram:shared", format="memory")


def test_memory_needs_a_size():
    from vblock.errors import UnknownOptionError

    with pytest.raises(UnknownOptionError) as info:
        vblock.open_image(None, format="memory")
    assert info.value.option == "size"


def test_null_reads_zeros_and_drops_writes():
    with vblock.open_image(None, format="null", size=1 << 20) as img:
        img.write(0, b"\xff" * 4096)
        assert img.read(0, 4096) == bytes(4096)
        assert img.block_status(0, 4096)[0].kind == ZERO
    with vblock.open_image(None, format="null") as img:
        assert img.size == 1 << 30
    with vblock.open_image(None, format="null", size=4096, read_zeroes="off") as img:
        buf = bytearray(b"\x01" * 4096)
        img.submit_read(0, buf).result()
        assert buf == b"\x01" * 4096


def _unsupported(*args, **kwargs):
    from vblock.future import failed

    return failed(OSError(errno.EOPNOTSUPP, "not on this file system"))


def test_raw_discard_where_the_host_cannot_punch_is_a_visible_no_op(scratch, monkeypatch):
    path = os.path.join(scratch, "nopunch.raw")
    with open(path, "wb") as f:
        f.write(b"\x66" * 65536)
    with vblock.open_image(path, format="raw") as img:
        monkeypatch.setattr(img.driver.hostfile, "submit_discard", _unsupported)
        img.discard(0, 65536)  # no error
        assert img.info()["discard"] == "unsupported"
        img.discard(0, 4096)  # remembered: not even tried again
        assert img.read(0, 65536) == b"\x66" * 65536


def test_raw_write_zeroes_falls_back_to_writing_zeros(scratch, monkeypatch):
    path = os.path.join(scratch, "nozero.raw")
    with open(path, "wb") as f:
        f.write(b"\x66" * 65536)
    for cache in ("none", "writeback"):
        with vblock.open_image(path, format="raw", cache=cache) as img:
            monkeypatch.setattr(img.driver.hostfile, "submit_zero_range", _unsupported)
            img.write_zeroes(1000, 20000)
            assert img.info()["write-zeroes"] == "write"
            img.write_zeroes(30000, 100)  # now without asking the host
            expect = (
                b"\x66" * 1000
                + bytes(20000)
                + b"\x66" * 9000
                + bytes(100)
                + b"\x66" * (65536 - 30100)
            )
            assert img.read(0, 65536) == expect
        with open(path, "wb") as f:
            f.write(b"\x66" * 65536)

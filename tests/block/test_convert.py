"""The copy engine (``vblock.block.convert``) on open images, without the CLI around it."""

import errno
import os

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

import vblock
from tests.files import digest
from vblock.block import convert as engine
from vblock.block.image import Image
from vblock.future import failed

G = engine.ZERO_GRANULE  # the zero detection unit of a destination without clusters
MiB = 1 << 20


def memory(size, fill=b"\0"):
    img = vblock.open_image(None, format="memory", size=size)
    if fill != b"\0":
        img.write(0, fill * size)
    return img


# a source as a list of granules: None is a granule of zeros, an int a granule of that byte
granules = st.lists(st.one_of(st.none(), st.integers(1, 255)), min_size=1, max_size=24)


@settings(max_examples=40, deadline=None)
@given(layout=granules, zero_init=st.booleans(), depth=st.integers(1, 4))
def test_convert_makes_the_destination_read_as_the_source(layout, zero_init, depth):
    """Whatever the mix of data and zero granules: the destination reads as the source; zeros
    inside data are skipped on a destination that reads as zeros, and written on one that does
    not (``zero_init=False``: here a destination full of 0xff)."""
    data = b"".join(bytes(G) if b is None else bytes([b]) * G for b in layout)
    with memory(len(data)) as src, memory(len(data), b"\0" if zero_init else b"\xff") as dst:
        src.write(0, data)
        stats = engine.convert(src, dst, zero_init=zero_init, depth=depth)
        assert dst.read(0, len(data)) == data
    zeros = layout.count(None) * G
    assert stats == engine.ConvertStats(
        planned=len(data), copied=len(data) - zeros, zero_skipped=zeros
    )


def test_convert_reports_the_planned_bytes_once_then_every_byte_done():
    size = 3 * engine.CHUNK + G
    calls, done = [], []

    def progress(total):
        calls.append(total)
        return done.append

    with memory(size) as src, memory(size) as dst:
        src.write(0, os.urandom(size))
        engine.convert(src, dst, progress=progress)
    assert calls == [size]
    assert sum(done) == size and len(done) == 4  # one call per chunk


@pytest.mark.parametrize("cache, flushes", [("unsafe", 0), ("writeback", 1), ("none", 1)])
def test_convert_flushes_the_destination_unless_its_cache_mode_is_unsafe(
    scratch, monkeypatch, cache, flushes
):
    calls = []
    real = Image.flush
    monkeypatch.setattr(Image, "flush", lambda self: (calls.append(self.path), real(self))[1])
    path = str(scratch / "d.raw")
    with open(path, "wb") as f:
        f.truncate(MiB)
    with memory(MiB) as src, vblock.open_image(path, format="raw", cache=cache) as dst:
        src.write(0, b"\x42" * MiB)
        engine.convert(src, dst)
        assert calls == [path] * flushes
    with open(path, "rb") as f:
        assert f.read() == b"\x42" * MiB


def test_convert_refuses_a_smaller_destination_before_writing_to_it(scratch):
    path = scratch / "small.raw"
    path.write_bytes(b"\x07" * (MiB - G))
    before = digest(path)
    with memory(MiB) as src, vblock.open_image(str(path), format="raw", cache="writeback") as dst:
        src.write(0, os.urandom(MiB))
        with pytest.raises(
            ValueError, match=r"small\.raw is smaller \(1044480 bytes\) than the source \(1048576"
        ):
            engine.convert(src, dst)
    assert digest(path) == before


def test_convert_refuses_a_depth_below_one():
    with (
        memory(G) as src,
        memory(G) as dst,
        pytest.raises(ValueError, match="depth must be at least 1"),
    ):
        engine.convert(src, dst, depth=0)


def test_convert_raises_the_first_write_error_after_every_request_completed():
    """A destination that fails every write with ENOSPC: ``convert`` raises that OSError, and by
    then every request it submitted has completed (nothing is left in flight on the images)."""
    size = 8 * engine.CHUNK
    submitted, completed = [], []
    with memory(size) as src, memory(size) as dst:
        src.write(0, os.urandom(size))
        real = dst.submit_write

        def full(offset, data):
            submitted.append(offset)
            fut = (
                failed(OSError(errno.ENOSPC, "No space left on device"))
                if offset
                else real(offset, data)
            )
            fut.add_done_callback(lambda f: completed.append(offset))
            return fut

        dst.submit_write = full
        with pytest.raises(OSError) as e:
            engine.convert(src, dst, depth=2)
    assert e.value.errno == errno.ENOSPC
    assert submitted and sorted(completed) == sorted(submitted)
    assert len(submitted) < size // engine.CHUNK  # the error stopped the submission of new chunks

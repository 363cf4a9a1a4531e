"""Checks at the edge: every bad request raises the documented exception and changes nothing."""

import os
import pathlib

import pytest

import vblock
from tests.files import digest
from vblock.errors import ReadOnlyError, UnknownFormatError, UnknownOptionError

SIZE = 64 * 1024


@pytest.fixture
def disk(scratch):
    """A raw file of random bytes and its checksum."""
    path = os.path.join(scratch, "disk.raw")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return path, digest(path)


BAD_REQUESTS = [
    ("read past the end", lambda img: img.read(SIZE - 10, 11), ValueError),
    ("read at a negative offset", lambda img: img.read(-1, 10), ValueError),
    ("read of a negative length", lambda img: img.read(0, -1), ValueError),
    ("write past the end", lambda img: img.write(SIZE - 10, b"x" * 20), ValueError),
    ("write at the size", lambda img: img.write(SIZE, b"x"), ValueError),
    ("write at a negative offset", lambda img: img.write(-512, b"x" * 512), ValueError),
    ("write with a float offset", lambda img: img.write(512.0, b"x" * 512), TypeError),
    ("write with a bool offset", lambda img: img.write(True, b"x"), TypeError),
    ("write_zeroes of a negative length", lambda img: img.write_zeroes(0, -1), ValueError),
    ("write_zeroes past the end", lambda img: img.write_zeroes(4096, SIZE), ValueError),
    ("discard past the end", lambda img: img.discard(SIZE, 1), ValueError),
    ("discard of a negative length", lambda img: img.discard(0, -4096), ValueError),
    ("resize to a negative size", lambda img: img.resize(-1), ValueError),
    ("resize to an unaligned size", lambda img: img.resize(SIZE + 1), ValueError),
    ("read into bytes", lambda img: img.submit_read(0, [b"x" * 512]), TypeError),
    (
        "read into a strided view",
        lambda img: img.submit_read(0, memoryview(bytearray(1024))[::2]),
        ValueError,
    ),
    ("block_status past the end", lambda img: img.block_status(0, SIZE + 1), ValueError),
]


@pytest.mark.parametrize("what,call,exc", BAD_REQUESTS, ids=[r[0] for r in BAD_REQUESTS])
def test_bad_request_raises_and_leaves_the_file_unchanged(disk, what, call, exc):
    path, before = disk
    with vblock.open_image(path, format="raw") as img:
        with pytest.raises(exc):
            call(img)
        assert img.size == SIZE
    assert digest(path) == before


READ_ONLY_CALLS = [
    ("write", lambda img: img.write(0, b"x" * 512)),
    ("submit_write", lambda img: img.submit_write(1, [b"x"])),
    ("write_zeroes", lambda img: img.write_zeroes(0, 512)),
    ("discard", lambda img: img.discard(0, 4096)),
    ("resize", lambda img: img.resize(2 * SIZE)),
    ("repair", lambda img: img.check(repair=True)),
]


@pytest.mark.parametrize("what,call", READ_ONLY_CALLS, ids=[r[0] for r in READ_ONLY_CALLS])
def test_read_only_image_refuses_writes(disk, what, call):
    path, before = disk
    with vblock.open_image(path, format="raw", read_only=True) as img:
        with pytest.raises(ReadOnlyError):
            call(img)
        assert img.read(0, 16) == pathlib.Path(path).read_bytes()[:16]
    assert digest(path) == before
    assert issubclass(ReadOnlyError, PermissionError)


def test_unknown_format_names_it(disk):
    path, before = disk
    with pytest.raises(UnknownFormatError, match="'vmdk9'"):
        vblock.open_image(path, format="vmdk9")
    with pytest.raises(UnknownFormatError):
        vblock.create_image(path, "vmdk9", SIZE)
    assert digest(path) == before


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"bogus": 1}, "bogus"),
        ({"cache": "directsync"}, "cache"),
        ({"aio": "native"}, "aio"),
        ({"discard": "on"}, "discard"),
    ],
)
def test_unknown_option_names_it(disk, kwargs, name):
    path, before = disk
    with pytest.raises(UnknownOptionError) as info:
        vblock.open_image(path, format="raw", **kwargs)
    assert info.value.option == name
    assert name in str(info.value)
    assert digest(path) == before


def test_unknown_create_option_names_it(scratch):
    path = os.path.join(scratch, "new.raw")
    with pytest.raises(UnknownOptionError) as info:
        vblock.create_image(path, "raw", SIZE, cluster_size=65536)
    assert info.value.option == "cluster_size"
    assert not os.path.exists(path)


def test_bad_option_value_names_the_option():
    with pytest.raises(UnknownOptionError) as info:
        vblock.open_image(None, format="memory", size="lots")
    assert info.value.option == "size"


def test_closed_image_refuses_io(disk):
    path, before = disk
    img = vblock.open_image(path, format="raw")
    img.close()
    img.close()  # idempotent
    assert img.closed
    with pytest.raises(ValueError, match="closed"):
        img.write(0, b"x" * 512)
    assert digest(path) == before

"""Model-based tests: random operation sequences against a bytearray model of the disk.

Offsets and lengths are drawn around alignment boundaries (512, 4096) as well as anywhere, and
every data transfer is cut into a random list of buffers of random kinds (bytes, bytearray,
memoryviews at odd addresses, page-aligned buffers), so the bounce, read-modify-write and
zero-copy paths of ``vblock.block.image`` are all exercised. The whole disk is compared with the
model after every step.
"""

import os
import random
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vblock
from tests.block.block_helpers import StrictMemory
from vblock.block.bounce import aligned_buffer

MAX_SIZE = 64 * 1024
MAX_IO = 12 * 1024


def _scratch_base():
    for cand in (os.environ.get("VBLOCK_TEST_DIR"), "/var/tmp", tempfile.gettempdir()):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK):
            return cand
    return None


def _point(data, lo, hi):
    """An integer in [lo, hi], often on or next to a 512/4096 boundary."""
    if hi <= lo:
        return lo
    near = data.draw(st.booleans(), label="near boundary")
    if not near:
        return data.draw(st.integers(lo, hi))
    unit = data.draw(st.sampled_from([512, 4096]))
    base = data.draw(st.integers(lo // unit, hi // unit)) * unit
    return min(hi, max(lo, base + data.draw(st.sampled_from([0, 0, 1, -1, 7]))))


def _pieces(data, length):
    """Random cut points splitting ``length`` bytes into 1..5 pieces."""
    n = data.draw(st.integers(0, 4), label="cuts")
    cuts = sorted(data.draw(st.integers(0, length)) for _ in range(n))
    edges = [0] + cuts + [length]
    return [(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _carrier(data, chunk: bytes, writable: bool):
    """``chunk``'s bytes in a buffer of a random kind; returns (buffer, view to read it back)."""
    kinds = ["bytearray", "odd", "aligned"] + ([] if writable else ["bytes"])
    kind = data.draw(st.sampled_from(kinds), label="buffer kind")
    n = len(chunk)
    if kind == "bytes":
        return chunk, memoryview(chunk)
    if kind == "bytearray":
        b = bytearray(chunk)
        return b, memoryview(b)
    if kind == "odd":
        shift = data.draw(st.integers(1, 7))
        b = memoryview(bytearray(n + shift))[shift:]
        b[:] = chunk
        return b, b
    b = aligned_buffer(n)
    b[:] = chunk
    return b, b


class ImageMachine(RuleBasedStateMachine):
    """Subclasses set ``open_kwargs`` (vblock.open_image keywords)."""

    open_kwargs: dict = {}

    def __init__(self):
        super().__init__()
        self.img = None
        self.dir = None

    @initialize(data=st.data())
    def open(self, data):
        size = data.draw(st.integers(1, MAX_SIZE // 512)) * 512
        if self.open_kwargs["format"] in ("memory", "strict"):
            self.img = vblock.open_image(None, size=size, **self.open_kwargs)
        else:
            self.dir = tempfile.mkdtemp(prefix="vblock-model-", dir=_scratch_base())
            path = os.path.join(self.dir, "disk.raw")
            with open(path, "wb") as f:
                f.truncate(size)
            self.img = vblock.open_image(path, **self.open_kwargs)
        self.model = bytearray(size)
        self.rng = random.Random(data.draw(st.integers(0, 2**32)))

    def teardown(self):
        if self.img is not None:
            self.img.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _range(self, data):
        size = len(self.model)
        offset = _point(data, 0, size)
        length = _point(data, 0, min(MAX_IO, size - offset))
        return offset, length

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), fua=st.booleans())
    def write(self, data, fua):
        offset, length = self._range(data)
        payload = self.rng.randbytes(length)
        buffers = [_carrier(data, payload[a:b], False)[0] for a, b in _pieces(data, length)]
        assert self.img.submit_write(offset, buffers, fua=fua).result(timeout=30) == length
        self.model[offset : offset + length] = payload

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def read(self, data):
        offset, length = self._range(data)
        pairs = [_carrier(data, bytes(b - a), True) for a, b in _pieces(data, length)]
        assert self.img.submit_read(offset, [p[0] for p in pairs]).result(timeout=30) == length
        got = b"".join(bytes(p[1]) for p in pairs)
        assert got == self.model[offset : offset + length]

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), may_unmap=st.booleans())
    def write_zeroes(self, data, may_unmap):
        offset, length = self._range(data)
        self.img.write_zeroes(offset, length, may_unmap=may_unmap)
        self.model[offset : offset + length] = bytes(length)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def discard(self, data):
        offset, length = self._range(data)
        self.img.discard(offset, length)
        if self.img.info().get("discard") != "unsupported":  # a punched hole reads as zeros
            self.model[offset : offset + length] = bytes(length)

    @precondition(lambda self: self.img is not None)
    @rule()
    def flush(self):
        self.img.flush()

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def resize(self, data):
        size = data.draw(st.integers(1, MAX_SIZE // 512)) * 512
        self.img.resize(size)
        if size > len(self.model):
            self.model.extend(bytes(size - len(self.model)))
        else:
            del self.model[size:]

    @invariant()
    def matches_model(self):
        if self.img is None:
            return
        assert self.img.size == len(self.model)
        assert self.img.read(0, len(self.model)) == self.model


_settings = settings(
    max_examples=int(os.environ.get("VBLOCK_MODEL_EXAMPLES", "25")),
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


@_settings
class RawDirect(ImageMachine):
    open_kwargs = {"format": "raw", "cache": "none"}


@_settings
class RawWriteback(ImageMachine):
    open_kwargs = {"format": "raw", "cache": "writeback"}


@_settings
class Memory(ImageMachine):
    open_kwargs = {"format": "memory"}


@_settings
class Strict(ImageMachine):
    """An asynchronous driver with awkward limits that records any request breaking them."""

    open_kwargs = {"format": "strict"}

    def __init__(self):
        vblock.block.register("strict", StrictMemory)
        super().__init__()

    @invariant()
    def limits_respected(self):
        assert StrictMemory.violations == []


TestRawDirect = RawDirect.TestCase
TestRawWriteback = RawWriteback.TestCase
TestMemory = Memory.TestCase
TestStrict = Strict.TestCase


def test_raw_direct_really_bounces():
    """The raw-direct machine above is only worth running if that image has alignment limits."""
    d = tempfile.mkdtemp(dir=_scratch_base())
    try:
        path = os.path.join(d, "x.raw")
        with open(path, "wb") as f:
            f.truncate(4096)
        with vblock.open_image(path, format="raw", cache="none") as img:
            assert img.limits.request_alignment >= 512
            assert img.limits.mem_alignment > 1
    finally:
        shutil.rmtree(d)

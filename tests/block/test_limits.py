"""The guarantees Image gives drivers (interface.py), checked by a driver that asserts them
(``StrictMemory`` in block_helpers.py), plus backing-chain status and raw on a block device."""

import errno
import os
import random
import subprocess

import pytest

import vblock
from tests.block.block_helpers import StrictMemory
from vblock.block import DATA, UNALLOCATED, ZERO, Limits, Run, registry
from vblock.block.bounce import aligned_buffer
from vblock.drivers.memory.driver import MemoryDriver
from vblock.future import Future, failed


@pytest.fixture
def strict():
    registry.register("strict", StrictMemory)
    StrictMemory.violations = []
    StrictMemory.calls = []
    img = vblock.open_image(None, format="strict", size=256 * 1024)
    yield img
    img.close()
    registry.unregister("strict")


def test_random_requests_respect_the_driver_limits(strict):
    rng = random.Random(7)
    model = bytearray(strict.size)
    for _ in range(300):
        offset = rng.randrange(strict.size)
        length = rng.randint(0, min(20000, strict.size - offset))
        op = rng.random()
        if op < 0.45:
            data = rng.randbytes(length)
            cut = rng.randint(0, length)
            shift = rng.randint(0, 3)
            odd = memoryview(bytearray(len(data) - cut + shift))[shift:]
            odd[:] = data[cut:]
            strict.submit_write(offset, [data[:cut], odd]).result(timeout=10)
            model[offset : offset + length] = data
        elif op < 0.6:
            strict.write_zeroes(offset, length)
            model[offset : offset + length] = bytes(length)
        else:
            assert strict.read(offset, length) == model[offset : offset + length]
    assert strict.read(0, strict.size) == model
    assert StrictMemory.violations == []
    assert "write" in StrictMemory.calls and "read" in StrictMemory.calls


def test_aligned_requests_into_aligned_memory_are_not_copied(strict, monkeypatch):
    seen = []
    original = StrictMemory.submit_write

    def spy(self, offset, buffers, fua=False):
        seen.extend(buffers)
        return original(self, offset, buffers, fua)

    monkeypatch.setattr(StrictMemory, "submit_write", spy)
    buf = vblock.block.bounce.aligned_buffer(4096)
    buf[:] = b"\x33" * 4096
    with vblock.open_image(None, format="strict", size=65536) as img:
        img.submit_write(8192, [buf]).result(timeout=10)
        assert len(seen) == 1 and seen[0] is buf  # the caller's own memoryview reached the driver
        assert img.read(8192, 4096) == b"\x33" * 4096


@pytest.mark.parametrize("count", [2, 8])  # checked in Python, and by one native call
def test_scattered_requests_pass_through_or_bounce_as_a_whole(strict, monkeypatch, count):
    """A request of many buffers reaches the driver as the caller's own views when every one is
    aligned, and is bounced (the driver sees other memory, the bytes arrive the same) when one
    of them is not."""
    seen = []
    for name in ("submit_write", "submit_read"):
        original = getattr(StrictMemory, name)

        def spy(self, offset, buffers, *rest, _original=original):
            seen.append(list(buffers))
            return _original(self, offset, buffers, *rest)

        monkeypatch.setattr(StrictMemory, name, spy)
    n = 512  # count * n stays within the driver's 4 KiB transfers
    big = aligned_buffer(2 * count * n + 4096)
    pieces = [big[2 * i * n : (2 * i + 1) * n] for i in range(count)]
    for i, p in enumerate(pieces):
        p[:] = bytes([i + 1]) * n
    with vblock.open_image(None, format="strict", size=65536) as img:  # opened after the spies
        img.submit_write(0, pieces).result(timeout=10)
        assert len(seen) == 1 and len(seen[0]) == count
        assert all(b is p for b, p in zip(seen[0], pieces))  # the caller's own views, not copies
        back = [aligned_buffer(n) for _ in range(count)]
        img.submit_read(0, back).result(timeout=10)
        assert len(seen) == 2 and all(b is p for b, p in zip(seen[1], back))
        assert [bytes(b) for b in back] == [bytes([i + 1]) * n for i in range(count)]
        seen.clear()
        shifted = pieces[:-1] + [big[-n - 7 : -7]]  # the last one 7 bytes off the 64-byte alignment
        shifted[-1][:] = b"\x77" * n
        img.submit_write(count * n, shifted).result(timeout=10)
        assert seen and not any(b is p for batch in seen for b in batch for p in shifted)
        assert img.read(count * n, count * n) == b"".join(bytes(p) for p in shifted)
    assert StrictMemory.violations == []


def test_big_request_is_split_at_max_transfer(strict):
    data = os.urandom(40960)
    strict.write(0, data)
    assert strict.read(0, 40960) == data
    assert StrictMemory.violations == []
    assert StrictMemory.calls.count("write") >= 10


class _Layer(MemoryDriver):
    """A memory layer whose first half is unallocated (so the backing file decides)."""

    format_name = "layer"
    backing_image = None

    def block_status(self, offset, length):
        half = self.size // 2
        runs = []
        if offset < half:
            n = min(half, offset + length) - offset
            runs.append(Run(offset, n, UNALLOCATED))
            offset, length = offset + n, length - n
        if length:
            runs.append(Run(offset, length, DATA, offset))
        return runs

    @property
    def backing(self):
        return self.backing_image


def test_block_status_resolves_the_backing_chain():
    registry.register("layer", _Layer)
    try:
        base = vblock.open_image(None, format="null", size=8192)  # all ZERO, shorter than the top
        top = vblock.open_image(None, format="layer", size=32768)
        top.driver.backing_image = base
        runs = top.block_status(0, 32768)
        assert runs == [
            Run(0, 8192, ZERO, None, 1),
            Run(8192, 8192, ZERO, None, 0),
            Run(16384, 16384, DATA, 16384, 0),
        ]
        top.driver.backing_image = None
        assert top.block_status(0, 32768)[0] == Run(0, 16384, ZERO, None, 0)
    finally:
        registry.unregister("layer")


@pytest.fixture
def loop_device(scratch):
    if os.geteuid() != 0 or not os.path.exists("/dev/loop-control"):
        pytest.skip("needs root and loop devices")
    backing = os.path.join(scratch, "loop.img")
    with open(backing, "wb") as f:
        f.truncate(4 << 20)
    try:
        dev = subprocess.run(
            ["losetup", "-f", "--show", backing], check=True, capture_output=True, text=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"losetup failed: {exc}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_raw_on_a_block_device(loop_device):
    from vblock.errors import UnsupportedError

    with vblock.open_image(loop_device, format="raw") as img:
        assert img.size == 4 << 20
        assert img.info()["block-device"] is True
        img.write(1001, b"on a block device")
        assert img.read(1000, 19) == b"\x00on a block device\x00"
        img.write(0, b"\xee" * 8192)
        img.write_zeroes(100, 1000)  # partial blocks: generic zero fill
        img.write_zeroes(4096, 4096, may_unmap=True)
        assert img.read(0, 8192) == b"\xee" * 100 + bytes(1000) + b"\xee" * 2996 + bytes(4096)
        img.discard(1, 8190)  # advisory; only whole blocks reach the device
        assert img.block_status(0, img.size) == [Run(0, 4 << 20, DATA, 0)]
        with pytest.raises(UnsupportedError):
            img.resize(1 << 20)


class HeldWrites(MemoryDriver):
    """512-byte alignment; writes wait in ``held`` until the test calls ``land()``."""

    format_name = "held"

    def __init__(self, *a):
        super().__init__(*a)
        self.limits = Limits(request_alignment=512, mem_alignment=1)
        self.held = []
        self.reads = []

    def submit_read(self, offset, buffers):
        self.reads.append(offset)
        return super().submit_read(offset, buffers)

    def submit_write(self, offset, buffers, fua=False):
        fut = Future()
        self.held.append((fut, offset, b"".join(bytes(b) for b in buffers)))
        return fut

    def land(self):
        """Apply and complete every held write, in order (completions may submit more)."""
        while self.held:
            fut, offset, data = self.held.pop(0)
            MemoryDriver.submit_write(self, offset, [data])
            fut.set_result(len(data))


@pytest.fixture
def held():
    registry.register("held", HeldWrites)
    img = vblock.open_image(None, format="held", size=8192)
    yield img
    img.close()
    registry.unregister("held")


def test_read_modify_write_waits_for_a_plain_write_in_flight(held):
    drv = held.driver
    block = aligned_buffer(512)
    block[:] = b"X" * 512
    plain = held.submit_write(0, [block])  # zero-copy path; not landed yet
    rmw = held.submit_write(10, [b"w" * 10])  # read-modify-write of the same block
    assert drv.reads == []  # the RMW has not read the block under the plain write
    drv.land()
    assert plain.result(timeout=5) == 512 and rmw.result(timeout=5) == 10
    assert drv.reads == [0]
    assert held.read(0, 512) == b"X" * 10 + b"w" * 10 + b"X" * 492


def test_plain_write_waits_for_a_read_modify_write_in_flight(held):
    drv = held.driver
    rmw = held.submit_write(600, [b"r" * 20])  # RMW of block 1: read done, write held
    block = aligned_buffer(1024)
    block[:] = b"P" * 1024
    plain = held.submit_write(0, [block])  # covers blocks 0-1: must not reach the driver yet
    assert len(drv.held) == 1
    drv.land()
    assert rmw.result(timeout=5) == 20 and plain.result(timeout=5) == 1024
    assert held.read(0, 1024) == b"P" * 1024  # the plain write, queued second, lands last


def test_writes_to_other_blocks_do_not_wait(held):
    drv = held.driver
    held.submit_write(600, [b"r" * 20])
    block = aligned_buffer(512)
    held.submit_write(4096, [block])
    assert len(drv.held) == 2
    drv.land()


class FailingWrites(MemoryDriver):
    """512-byte alignment; every write fails with EIO; write_zeroes asks for the fallback."""

    format_name = "failing"

    def __init__(self, *a):
        super().__init__(*a)
        self.limits = Limits(request_alignment=512, mem_alignment=1)

    def submit_write(self, offset, buffers, fua=False):
        return failed(OSError(errno.EIO, "injected write failure"))

    def submit_write_zeroes(self, offset, length, may_unmap):
        return None


@pytest.mark.parametrize(
    "call",
    [
        lambda img: img.write(512, b"a" * 512),  # aligned, copied from unaligned memory
        lambda img: img.write(100, b"b" * 10),  # read-modify-write
        lambda img: img.write_zeroes(0, 100000),  # generic zero fill, several requests
        lambda img: img.write_zeroes(7, 9),
    ],
    ids=["bounce", "rmw", "zero-fill", "zero-fill-rmw"],
)
def test_write_failures_reach_the_caller_and_free_the_range(call):
    registry.register("failing", FailingWrites)
    try:
        with vblock.open_image(None, format="failing", size=1 << 20) as img:
            for _ in range(2):  # the second try would hang if the first left its range locked
                with pytest.raises(OSError) as info:
                    call(img)
                assert info.value.errno == errno.EIO
            assert not img._rl.busy
    finally:
        registry.unregister("failing")

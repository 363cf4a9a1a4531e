"""Shared helpers for the block-layer tests: opening each kind of image the same way."""

from __future__ import annotations

import os
import random
import threading

import vblock
from vblock.block import Limits
from vblock.block.bounce import address_of
from vblock.drivers.memory.driver import MemoryDriver
from vblock.future import Future

#: (id, open keywords) of every configuration the generic tests run against.
CONFIGS = [
    ("raw-none", {"format": "raw", "cache": "none"}),
    ("raw-writeback", {"format": "raw", "cache": "writeback"}),
    ("memory", {"format": "memory"}),
]


def make_image(scratch, name: str, size: int, config: dict, content: bytes | None = None):
    """Open a fresh image of ``size`` bytes for ``config`` (a CONFIGS entry's keywords)."""
    if config["format"] in ("memory", "strict", "laggy"):
        img = vblock.open_image(None, size=size, **config)
        if content:
            img.write(0, content)
        return img
    path = os.path.join(scratch, name)
    with open(path, "wb") as f:
        if content:
            f.write(content)
        f.truncate(size)
    return vblock.open_image(path, **config)


class _WorkerMemory(MemoryDriver):
    """A RAM disk with a worker thread that runs posted jobs in batches (shuffled when
    ``shuffle``), so that futures complete on a thread of their own."""

    shuffle = False

    def __init__(self, *a):
        super().__init__(*a)
        self._jobs = []
        self._cv = threading.Condition()
        self._rng = random.Random(99)
        self._worker = threading.Thread(target=self._run, daemon=True)
        self._worker.start()

    def _run(self):
        while True:
            with self._cv:
                while not self._jobs:
                    self._cv.wait()
                batch, self._jobs = self._jobs, []
            if self.shuffle:
                self._rng.shuffle(batch)
            for job in batch:
                if job is None:
                    return
                job()

    def _post(self, job):
        with self._cv:
            self._jobs.append(job)
            self._cv.notify()

    def close(self):
        self._post(None)
        self._worker.join()


class StrictMemory(_WorkerMemory):
    """A RAM disk that declares awkward limits (512-byte requests, 64-byte buffer addresses,
    4 KiB transfers) and records every request that breaks them in ``violations``; it completes
    its futures on its worker thread, so bounce and read-modify-write chains run asynchronously.
    Register it with ``vblock.block.register("strict", StrictMemory)``."""

    format_name = "strict"
    violations: list = []
    calls: list = []

    def __init__(self, *a):
        super().__init__(*a)
        self.limits = Limits(request_alignment=512, mem_alignment=64, max_transfer=4096)

    def _later(self, inner):
        out = Future()
        value = inner.result()
        self._post(lambda: out.set_result(value))
        return out

    def _check(self, op, offset, buffers):
        total = sum(len(b) for b in buffers)
        problems = []
        if offset % 512:
            problems.append("offset")
        if total > 4096:
            problems.append("max_transfer")
        if offset + total > self.size:
            problems.append("range")
        for b in buffers:
            if type(b) is not memoryview or b.format != "B":
                problems.append("type")
            elif len(b) % 512:
                problems.append("length")
            elif address_of(b) % 64:
                problems.append("address")
        if problems:
            self.violations.append((op, offset, [len(b) for b in buffers], problems))
        self.calls.append(op)

    def submit_read(self, offset, buffers):
        self._check("read", offset, buffers)
        return self._later(super().submit_read(offset, buffers))

    def submit_write(self, offset, buffers, fua=False):
        self._check("write", offset, buffers)
        return self._later(super().submit_write(offset, buffers, fua))

    def submit_write_zeroes(self, offset, length, may_unmap):
        return None  # ask for the generic fallback: zero buffers through the write path


class LaggyMemory(_WorkerMemory):
    """A RAM disk with 512-byte request alignment whose writes land late, in random order.

    Reads are served at once from the bytes as they are; writes go to the worker thread, which
    applies each batch it finds in shuffled order and only then completes their futures. A write
    in flight has therefore not landed yet, which is exactly what a read-modify-write must not
    race with: a block layer that failed to serialise them would lose writes here, visibly.
    Register it with ``vblock.block.register("laggy", LaggyMemory)``."""

    format_name = "laggy"
    shuffle = True

    def __init__(self, *a):
        super().__init__(*a)
        self.limits = Limits(request_alignment=512, mem_alignment=1)

    def submit_write(self, offset, buffers, fua=False):
        fut = Future()
        data = b"".join(bytes(b) for b in buffers)

        def land():
            MemoryDriver.submit_write(self, offset, [data])
            fut.set_result(len(data))

        self._post(land)
        return fut

"""Helpers for the virtio tests: a fake backend with the ``vblock.block.Image`` request API, and a
helper that builds the whole guest-side stack (memory, device, mmio, driver).

(A module of its own, with a name no other test directory uses: ``from conftest import`` would
pick whichever conftest module the run imported first.)"""

from __future__ import annotations

import contextlib
import errno

from vblock.future import Future, completed, failed
from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
from vblock.virtio.driver import Driver


class FakeImage:
    """A RAM disk with ``Image``'s submit_* API.

    ``defer=True`` holds every request until the test completes it (:meth:`complete`), in any
    order; ``fail`` maps an operation name to an exception that its next request completes with.
    ``ops`` records ``(name, offset, length, extra)`` for every request accepted, and ``batched``
    the number of the ``batch()`` each arrived in (None outside one); ``batches`` counts them.
    """

    def __init__(self, size=1 << 20, read_only=False, defer=False):
        self.data = bytearray(size)
        self.size = size
        self.read_only = read_only
        self.defer = defer
        self.pending = []
        self.ops = []
        self.batched = []
        self.batches = 0
        self._in_batch = False
        self.fail = {}

    @contextlib.contextmanager
    def batch(self):
        self.batches += 1
        self._in_batch = True
        try:
            yield self
        finally:
            self._in_batch = False

    def _finish(self, name, action):
        self.batched.append(self.batches if self._in_batch else None)
        exc = self.fail.pop(name, None)
        if not self.defer:
            if exc is not None:
                return failed(exc)
            return completed(action())
        fut = Future()
        self.pending.append((fut, action, exc))
        return fut

    def complete(self, order=None):
        """Complete the held requests (all, or those at the given indices, in that order)."""
        items = self.pending if order is None else [self.pending[i] for i in order]
        self.pending = [p for p in self.pending if p not in items]
        for fut, action, exc in items:
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(action())

    def _check(self, offset, length):
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"request [{offset}, {offset + length}) beyond {self.size}")

    def submit_read(self, offset, buffers):
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        self.ops.append(("read", offset, total, None))

        def action():
            pos = offset
            for b in buffers:
                b[:] = self.data[pos : pos + len(b)]
                pos += len(b)
            return total

        return self._finish("read", action)

    def submit_write(self, offset, buffers, fua=False):
        if self.read_only:
            raise PermissionError("read-only")
        total = sum(len(b) for b in buffers)
        self._check(offset, total)
        self.ops.append(("write", offset, total, fua))

        def action():
            pos = offset
            for b in buffers:
                self.data[pos : pos + len(b)] = b
                pos += len(b)
            return total

        return self._finish("write", action)

    def submit_flush(self):
        self.ops.append(("flush", 0, 0, None))
        return self._finish("flush", lambda: None)

    def submit_discard(self, offset, length):
        self._check(offset, length)
        self.ops.append(("discard", offset, length, None))
        return self._finish("discard", lambda: None)

    def submit_write_zeroes(self, offset, length, may_unmap=False):
        self._check(offset, length)
        self.ops.append(("write_zeroes", offset, length, may_unmap))

        def action():
            self.data[offset : offset + length] = bytes(length)

        return self._finish("write_zeroes", action)


EIO = OSError(errno.EIO, "injected")


class Stack:
    """Guest memory, device, transport and driver, wired together."""

    def __init__(
        self,
        img,
        *,
        mem_size=8 << 20,
        num_queues=1,
        queue_size=None,
        queue_size_max=256,
        event_idx=True,
        indirect=False,
        read_only=None,
        serial="vblock0",
        start=True,
        deliver="callback",
        interrupt=None,
        irq_level=None,
        strict=False,
        **drv,
    ):
        self.img = img
        self.mem = GuestMemory.anonymous(mem_size)
        self.dev = VirtioBlk(
            img,
            self.mem,
            num_queues=num_queues,
            queue_size_max=queue_size_max,
            serial=serial,
            read_only=read_only,
            deliver=deliver,
        )
        self.mmio = VirtioMmio(self.dev, interrupt=interrupt, irq_level=irq_level, strict=strict)
        self.drv = Driver(
            self.mmio,
            self.mem,
            event_idx=event_idx,
            indirect=indirect,
            num_queues=num_queues,
            queue_size=queue_size,
            **drv,
        )
        if start:
            self.drv.start()

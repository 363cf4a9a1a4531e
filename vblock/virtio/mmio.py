"""VirtioMmio: the virtio-mmio version 2 register block (virtio 1.2, 4.2.2) over a device.

What a Unicorn-style emulator maps with ``mmio_map`` at a window of ``VIRTIO_MMIO_WINDOW`` bytes:
``read(offset, size) -> int`` and ``write(offset, size, value)`` for offsets inside the window, and
up to two interrupt callbacks:

* ``interrupt()``: an edge, called with no arguments whenever the device raises an interrupt (the
  guest reads ``InterruptStatus`` to learn why and acknowledges with ``InterruptACK``);
* ``irq_level(level)``: a level-triggered line (a GIC or PLIC input): called with True when
  InterruptStatus goes from zero to non-zero, and with False when it returns to zero, by the
  guest's InterruptACK (inside that register write) or by a device reset (inside the Status
  write). The level calls are made under the lock that guards InterruptStatus, in the order of
  its updates, so the line is never left high with the status at zero, or low with it non-zero.

Threads: both callbacks run on the thread that raised the interrupt: with the device's default
``deliver="callback"`` a backend completion thread (an engine's or a driver's pool thread), or the
thread that kicked the queue when a request completed at once; with ``deliver="poll"`` the thread
that calls ``dev.poll()``. ``irq_level(False)`` runs on the thread that wrote InterruptACK or
Status. ``irq_level`` must not block, nor wait for another thread that touches this transport; it
may itself acknowledge (the lock is re-entrant). Other observers (the test driver) register with
:meth:`VirtioMmio.add_interrupt_listener`, which never replaces either callback.

This is the transport boundary: a guest's illegal register access (a bad offset or width, a bad
status step, a queue that cannot be enabled, a write to a read-only register) is logged and
ignored here (reads answer 0), never raised into the emulator - unless ``strict=True``, for
bring-up, where it raises ``GuestError`` out of ``read`` / ``write``. Registers other than the
config space are 32 bits wide (4.2.2.1: the driver MUST use 32-bit accesses).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from vblock.errors import GuestError
from vblock.virtio import spec as S

if TYPE_CHECKING:
    from vblock.virtio.blk import VirtioBlk

__all__ = ["VirtioMmio", "VIRTIO_MMIO_WINDOW"]

_log = logging.getLogger(__name__)
_MASK32 = 0xFFFFFFFF

VIRTIO_MMIO_WINDOW = S.VIRTIO_MMIO_WINDOW

# Registers a driver may read (4.2.2); the rest are write-only.
_READABLE = frozenset(
    {
        S.VIRTIO_MMIO_MAGIC_VALUE,
        S.VIRTIO_MMIO_VERSION,
        S.VIRTIO_MMIO_DEVICE_ID,
        S.VIRTIO_MMIO_VENDOR_ID,
        S.VIRTIO_MMIO_DEVICE_FEATURES,
        S.VIRTIO_MMIO_QUEUE_NUM_MAX,
        S.VIRTIO_MMIO_QUEUE_NUM,
        S.VIRTIO_MMIO_QUEUE_READY,
        S.VIRTIO_MMIO_INTERRUPT_STATUS,
        S.VIRTIO_MMIO_STATUS,
        S.VIRTIO_MMIO_QUEUE_DESC_LOW,
        S.VIRTIO_MMIO_QUEUE_DESC_HIGH,
        S.VIRTIO_MMIO_QUEUE_DRIVER_LOW,
        S.VIRTIO_MMIO_QUEUE_DRIVER_HIGH,
        S.VIRTIO_MMIO_QUEUE_DEVICE_LOW,
        S.VIRTIO_MMIO_QUEUE_DEVICE_HIGH,
        S.VIRTIO_MMIO_SHM_LEN_LOW,
        S.VIRTIO_MMIO_SHM_LEN_HIGH,
        S.VIRTIO_MMIO_SHM_BASE_LOW,
        S.VIRTIO_MMIO_SHM_BASE_HIGH,
        S.VIRTIO_MMIO_CONFIG_GENERATION,
    }
)


def _check_callback(name, fn):
    if fn is not None and not callable(fn):
        raise TypeError(f"{name} must be callable or None, not {type(fn).__name__}")


class VirtioMmio:
    """``VirtioMmio(dev, interrupt=None, irq_level=None, strict=False)``: virtio-mmio v2 registers
    over ``dev`` (a ``VirtioBlk``). ``interrupt()`` and ``irq_level(level: bool)`` are described
    in the module docstring, with the threads that call them; ``strict=True`` raises
    ``GuestError`` for illegal register accesses instead of logging them."""

    def __init__(
        self,
        dev: VirtioBlk,
        interrupt: Callable[[], object] | None = None,
        irq_level: Callable[[bool], object] | None = None,
        *,
        strict: bool = False,
    ) -> None:
        for attr in ("attach", "notify", "queue", "set_status", "read_config"):
            if not callable(getattr(dev, attr, None)):
                raise TypeError(f"dev must be a VirtioBlk, not {type(dev).__name__}")
        _check_callback("interrupt", interrupt)
        _check_callback("irq_level", irq_level)
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, not {type(strict).__name__}")
        self.device = dev
        self.interrupt = interrupt
        self.irq_level = irq_level
        self.strict = strict
        self._listeners: tuple = ()
        self._isr_lock = threading.RLock()
        self.interrupt_status = 0
        self._reset_registers()
        self._driver_features = dev.driver_features  # a device restored from a saved state
        dev.attach(self._used_irq, self._config_irq)

    def add_interrupt_listener(self, fn: Callable[[], object]) -> None:
        """Also call ``fn()`` on every interrupt, after ``interrupt`` (same thread, see the module
        docstring). For observers such as the test driver; the callbacks stay as they are."""
        _check_callback("fn", fn)
        self._listeners = (*self._listeners, fn)

    def remove_interrupt_listener(self, fn: Callable[[], object]) -> None:
        self._listeners = tuple(f for f in self._listeners if f is not fn)

    def _reset_registers(self):
        self._set_isr(0)
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self._driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0

    # -- interrupts -----------------------------------------------------------------------------
    def _set_isr(self, value):
        """Store InterruptStatus and, on a zero/non-zero change, tell the level callback (both
        under the lock, so level calls follow status updates in order)."""
        with self._isr_lock:
            old = self.interrupt_status
            self.interrupt_status = value
            level = self.irq_level
            if level is not None and bool(old) != bool(value):
                level(bool(value))

    def _raise(self, bit):
        with self._isr_lock:
            self._set_isr(self.interrupt_status | bit)
        cb = self.interrupt
        if cb is not None:
            cb()
        for fn in self._listeners:
            fn()

    def _used_irq(self, _queue_index):
        self._raise(S.VIRTIO_MMIO_INT_VRING)

    def _config_irq(self):
        self._raise(S.VIRTIO_MMIO_INT_CONFIG)

    # -- register access ------------------------------------------------------------------------
    def _illegal(self, message):
        if self.strict:
            raise GuestError(f"virtio-mmio: {message}")
        _log.info("virtio-mmio: %s: ignored", message)

    def _queue(self):
        dev = self.device
        if self.queue_sel < dev.num_queues:
            return dev.queue(self.queue_sel)
        return None

    def read(self, offset: int, size: int) -> int:
        """The value of the register at ``offset`` (``size`` bytes); an illegal read answers 0
        (or raises ``GuestError`` when strict)."""
        if offset == S.VIRTIO_MMIO_INTERRUPT_STATUS and size == 4:  # the interrupt handler's read
            return self.interrupt_status
        dev = self.device
        if offset >= S.VIRTIO_MMIO_CONFIG:
            end = S.VIRTIO_MMIO_CONFIG + len(dev.config_bytes())
            if size not in (1, 2, 4, 8) or offset + size > end:
                self._illegal(f"{size}-byte config read at {offset:#x}")
                return 0
            return dev.read_config(offset - S.VIRTIO_MMIO_CONFIG, size)
        if size != 4 or offset not in _READABLE:
            self._illegal(f"{size}-byte read of register {offset:#x}")
            return 0
        if offset == S.VIRTIO_MMIO_MAGIC_VALUE:
            return S.MMIO_MAGIC_VALUE
        if offset == S.VIRTIO_MMIO_VERSION:
            return S.MMIO_VERSION
        if offset == S.VIRTIO_MMIO_DEVICE_ID:
            return dev.device_id
        if offset == S.VIRTIO_MMIO_VENDOR_ID:
            return S.MMIO_VENDOR_ID
        if offset == S.VIRTIO_MMIO_DEVICE_FEATURES:
            if self.device_features_sel > 1:
                return 0
            return dev.device_features >> (32 * self.device_features_sel) & _MASK32
        if offset == S.VIRTIO_MMIO_STATUS:
            return dev.status
        if offset == S.VIRTIO_MMIO_CONFIG_GENERATION:
            return dev.config_generation
        if offset in (S.VIRTIO_MMIO_SHM_LEN_LOW, S.VIRTIO_MMIO_SHM_LEN_HIGH):
            return _MASK32  # 4.2.2.1: no shared memory region: length reads as all ones
        if offset in (S.VIRTIO_MMIO_SHM_BASE_LOW, S.VIRTIO_MMIO_SHM_BASE_HIGH):
            return _MASK32
        q = self._queue()
        if offset == S.VIRTIO_MMIO_QUEUE_NUM_MAX:
            return q.size_max if q is not None else 0
        if q is None:
            return 0
        if offset == S.VIRTIO_MMIO_QUEUE_READY:
            return int(q.ready)
        if offset == S.VIRTIO_MMIO_QUEUE_NUM:
            return q.size
        if offset == S.VIRTIO_MMIO_QUEUE_DESC_LOW:
            return q.desc_addr & _MASK32
        if offset == S.VIRTIO_MMIO_QUEUE_DESC_HIGH:
            return q.desc_addr >> 32
        if offset == S.VIRTIO_MMIO_QUEUE_DRIVER_LOW:
            return q.driver_addr & _MASK32
        if offset == S.VIRTIO_MMIO_QUEUE_DRIVER_HIGH:
            return q.driver_addr >> 32
        if offset == S.VIRTIO_MMIO_QUEUE_DEVICE_LOW:
            return q.device_addr & _MASK32
        return q.device_addr >> 32  # QUEUE_DEVICE_HIGH, the last readable one

    def write(self, offset: int, size: int, value: int) -> None:
        """A register write; an illegal one is ignored (or raises ``GuestError`` when strict)."""
        if offset == S.VIRTIO_MMIO_QUEUE_NOTIFY and size == 4:  # the hot path: a kick
            value &= _MASK32
            if self.strict and value >= self.device.num_queues:
                raise GuestError(f"virtio-mmio: notify for absent queue {value}")
            self.device.notify(value)
            return
        try:
            self._write(offset, size, value)
        except GuestError as exc:  # the transport boundary: log and ignore (see module doc)
            if self.strict:
                message = f"virtio-mmio: write of {value:#x} at {offset:#x}: {exc}"
                raise GuestError(message, exc.status) from exc
            _log.info("virtio-mmio: write of %#x at %#x ignored: %s", value, offset, exc)

    def _write(self, offset, size, value):
        dev = self.device
        if offset >= S.VIRTIO_MMIO_CONFIG:
            dev.write_config(offset - S.VIRTIO_MMIO_CONFIG, size, value)
            return
        if size != 4:
            raise GuestError(f"{size}-byte register write")
        value &= _MASK32
        if offset == S.VIRTIO_MMIO_INTERRUPT_ACK:
            with self._isr_lock:
                self._set_isr(self.interrupt_status & ~value)
            return
        if offset == S.VIRTIO_MMIO_STATUS:
            dev.set_status(value)
            if value == 0:
                self._reset_registers()
            return
        if offset == S.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.device_features_sel = value
            return
        if offset == S.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
            return
        if offset == S.VIRTIO_MMIO_DRIVER_FEATURES:
            sel = self.driver_features_sel
            if sel > 1:
                raise GuestError(f"driver features word {sel} does not exist")
            shift = 32 * sel
            feats = (self._driver_features & ~(_MASK32 << shift)) | (value << shift)
            dev.set_driver_features(feats)
            self._driver_features = feats
            return
        if offset == S.VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
            return
        if offset == S.VIRTIO_MMIO_SHM_SEL:
            self.shm_sel = value
            return
        q = self._queue()
        if q is None:
            raise GuestError(f"queue register {offset:#x} for absent queue {self.queue_sel}")
        if offset == S.VIRTIO_MMIO_QUEUE_READY:
            dev.set_queue_ready(self.queue_sel, bool(value & 1))
            return
        if q.ready:
            raise GuestError(
                f"queue {self.queue_sel} register {offset:#x} written while ready"
            )  # 4.2.2.3
        if offset == S.VIRTIO_MMIO_QUEUE_NUM:
            q.size = value
        elif offset == S.VIRTIO_MMIO_QUEUE_DESC_LOW:
            q.desc_addr = (q.desc_addr & ~_MASK32) | value
        elif offset == S.VIRTIO_MMIO_QUEUE_DESC_HIGH:
            q.desc_addr = (q.desc_addr & _MASK32) | value << 32
        elif offset == S.VIRTIO_MMIO_QUEUE_DRIVER_LOW:
            q.driver_addr = (q.driver_addr & ~_MASK32) | value
        elif offset == S.VIRTIO_MMIO_QUEUE_DRIVER_HIGH:
            q.driver_addr = (q.driver_addr & _MASK32) | value << 32
        elif offset == S.VIRTIO_MMIO_QUEUE_DEVICE_LOW:
            q.device_addr = (q.device_addr & ~_MASK32) | value
        elif offset == S.VIRTIO_MMIO_QUEUE_DEVICE_HIGH:
            q.device_addr = (q.device_addr & _MASK32) | value << 32
        else:
            raise GuestError(f"write to read-only or unknown register {offset:#x}")

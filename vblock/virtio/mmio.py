"""VirtioMmio: the virtio-mmio version 2 register block (virtio 1.2, 4.2.2) over a device.

What a Unicorn-style emulator maps with ``mmio_map``: ``read(offset, size) -> int`` and
``write(offset, size, value)`` for offsets inside the block, and an ``interrupt`` callback, called
with no arguments whenever the device raises an interrupt (the guest reads ``InterruptStatus`` to
learn why and acknowledges with ``InterruptACK``).

This is the transport boundary: a guest's illegal register write (a bad status step, a queue that
cannot be enabled, a write to a read-only register) is logged and ignored here, never raised into
the emulator. Registers other than the config space are 32 bits wide (4.2.2.1: the driver MUST
use 32-bit accesses); other widths read as 0 and are ignored on write.
"""

from __future__ import annotations

import logging
import threading

from vblock.errors import GuestError
from vblock.virtio import spec as S

__all__ = ["VirtioMmio"]

_log = logging.getLogger(__name__)
_MASK32 = 0xFFFFFFFF


class VirtioMmio:
    """``VirtioMmio(dev, interrupt=callback)``: virtio-mmio v2 registers over ``dev`` (a
    ``VirtioBlk``)."""

    def __init__(self, dev, interrupt=None):
        self.device = dev
        self.interrupt = interrupt
        self._isr_lock = threading.Lock()
        self._reset_registers()
        dev.attach(self._used_irq, self._config_irq)

    def _reset_registers(self):
        self.interrupt_status = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self._driver_features = 0
        self.queue_sel = 0
        self.shm_sel = 0

    # -- interrupts -----------------------------------------------------------------------------
    def _raise(self, bit):
        with self._isr_lock:
            self.interrupt_status |= bit
        cb = self.interrupt
        if cb is not None:
            cb()

    def _used_irq(self, _queue_index):
        self._raise(S.VIRTIO_MMIO_INT_VRING)

    def _config_irq(self):
        self._raise(S.VIRTIO_MMIO_INT_CONFIG)

    # -- register access ------------------------------------------------------------------------
    def _queue(self):
        dev = self.device
        if self.queue_sel < dev.num_queues:
            return dev.queue(self.queue_sel)
        return None

    def read(self, offset, size):
        if offset == S.VIRTIO_MMIO_INTERRUPT_STATUS and size == 4:  # the interrupt handler's read
            return self.interrupt_status
        dev = self.device
        if offset >= S.VIRTIO_MMIO_CONFIG:
            return dev.read_config(offset - S.VIRTIO_MMIO_CONFIG, size)
        if size != 4:
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
        if offset == S.VIRTIO_MMIO_INTERRUPT_STATUS:
            return self.interrupt_status
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
        if offset == S.VIRTIO_MMIO_QUEUE_DEVICE_HIGH:
            return q.device_addr >> 32
        return 0

    def write(self, offset, size, value):
        if offset == S.VIRTIO_MMIO_QUEUE_NOTIFY and size == 4:  # the hot path: a kick
            self.device.notify(value & _MASK32)
            return
        try:
            self._write(offset, size, value)
        except GuestError as exc:  # the transport boundary: log and ignore (see module doc)
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
                self.interrupt_status &= ~value
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
            raise GuestError(f"queue {self.queue_sel} register {offset:#x} written while ready")  # 4.2.2.3
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

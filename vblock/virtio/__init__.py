"""virtio-blk devices over vblock images: guest memory, split and packed virtqueues, the device model,
the virtio-mmio transport, and (in ``vblock.virtio.driver``) a guest-side driver for tests.

```python
from vblock.virtio import VIRTIO_MMIO_WINDOW, GuestMemory, VirtioBlk, VirtioMmio
mem = GuestMemory([(RAM_BASE, ram)])            # the emulator's own mmap / bytearray
dev = VirtioBlk(img, mem, num_queues=1, queue_size_max=256, serial="vblock0", read_only=None,
                deliver="callback")            # or "poll": dev.poll() / dev.fileno()
mmio = VirtioMmio(dev, interrupt=edge_cb, irq_level=level_cb, strict=False)
mmio.read(offset, size) -> int; mmio.write(offset, size, value)   # offset < VIRTIO_MMIO_WINDOW
dev.stats(); dev.save_state(); VirtioBlk(img, mem, state=saved)
```

Which thread calls each callback is said in ``vblock.virtio.mmio``, ``vblock.virtio.blk`` and
``vblock.virtio.blk_datapath``; ``docs/examples/unicorn_virtio.py`` shows a CPU emulator driving
a device.
"""

from vblock.virtio.blk import VirtioBlk
from vblock.virtio.memory import GuestMemory, GuestMemoryError
from vblock.virtio.mmio import VIRTIO_MMIO_WINDOW, VirtioMmio

__all__ = ["GuestMemory", "GuestMemoryError", "VirtioBlk", "VirtioMmio", "VIRTIO_MMIO_WINDOW"]

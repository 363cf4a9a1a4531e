"""virtio-blk devices over vblock images: guest memory, split and packed virtqueues, the device model,
the virtio-mmio transport, and (in ``vblock.virtio.driver``) a guest-side driver for tests.

```python
from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
mem = GuestMemory.anonymous(size)
dev = VirtioBlk(img, mem, num_queues=1, queue_size_max=256, serial="vblock0", read_only=None)
mmio = VirtioMmio(dev, interrupt=callback)
mmio.read(offset, size) -> int; mmio.write(offset, size, value)
```
"""

from vblock.virtio.blk import VirtioBlk
from vblock.virtio.memory import GuestMemory, GuestMemoryError
from vblock.virtio.mmio import VirtioMmio

__all__ = ["GuestMemory", "GuestMemoryError", "VirtioBlk", "VirtioMmio"]

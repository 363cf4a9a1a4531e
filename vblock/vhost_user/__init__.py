"""vhost-user-blk: serve a vblock image to a VM (QEMU ``vhost-user-blk-pci``, Cloud Hypervisor ...).

```python
from vblock.vhost_user.server import Server
srv = Server("/tmp/vblock.sock", image, num_queues=1, serial="vblock0", writeback=True)
srv.serve_forever()   # until srv.stop(); then image.close()
```

``protocol`` is the sans-I/O message codec and session table, ``backend`` maps requests onto the
``VirtioBlk`` device model, ``server`` is the socket / fd / mmap / eventfd rim.
"""

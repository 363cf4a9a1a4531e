"""The VM machinery lives in ``vblock.testing.vm`` (the guest benchmark uses it too)."""

from vblock.testing.vm import MARK, Serve, artifacts, boot, cpio, initrd_for, missing, qemu_cmd  # noqa: F401

"""The VM machinery lives in ``vblock.bench.guest`` (the guest benchmark uses it too)."""

from vblock.bench.guest import MARK, Serve, artifacts, boot, cpio, initrd_for, missing, qemu_cmd  # noqa: F401

"""qcow2 (QEMU copy-on-write v2/v3) images, read-only: read, map, info, check, and convert from."""

from .driver import Qcow2Driver

DRIVER = Qcow2Driver

__all__ = ["Qcow2Driver", "DRIVER"]

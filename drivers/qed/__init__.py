"""QED (QEMU Enhanced Disk) images: byte-compatible with QEMU, with concurrent allocation."""

from .driver import QedDriver

DRIVER = QedDriver

__all__ = ["QedDriver", "DRIVER"]

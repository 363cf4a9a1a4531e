"""QED (QEMU Enhanced Disk) images: byte-compatible with QEMU, with concurrent allocation."""

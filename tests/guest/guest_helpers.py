"""Disks for the guest tests: images with a host pattern, their bytes, their check."""

from __future__ import annotations

import os
import subprocess

MiB = 1 << 20
DISK_BYTES = 64 * MiB
HOST_PATTERN_OFFSET = 1 * MiB
HOST_PATTERN = (b"VBLOCK-HOST-PATTERN-0123456789abcdef\n" * (MiB // 37 + 1))[:MiB]


def make_disk(directory, fmt, host_pattern=True, name="disk"):
    """A 64 MiB image of ``fmt`` (raw or qed), with the host pattern at 1 MiB if asked; QED copies
    are made by ``qemu-img convert`` as the reference does."""
    raw = os.path.join(directory, name + ".raw")
    with open(raw, "wb") as f:
        f.truncate(DISK_BYTES)
        if host_pattern:
            f.seek(HOST_PATTERN_OFFSET)
            f.write(HOST_PATTERN)
    if fmt == "raw":
        return raw
    qed = os.path.join(directory, name + ".qed")
    subprocess.run(
        ["qemu-img", "convert", "-f", "raw", "-O", "qed", raw, qed], check=True, capture_output=True
    )
    os.unlink(raw)
    return qed


def image_bytes(path, fmt):
    """The guest-visible bytes of an image (QED converted to raw by qemu-img)."""
    if fmt == "raw":
        with open(path, "rb") as f:
            return f.read()
    out = path + ".out.raw"
    subprocess.run(
        ["qemu-img", "convert", "-f", fmt, "-O", "raw", path, out], check=True, capture_output=True
    )
    try:
        with open(out, "rb") as f:
            return f.read()
    finally:
        os.unlink(out)


def qemu_img_check(path, fmt):
    """(exit status, output) of ``qemu-img check``; raw has nothing to check (returns 0)."""
    if fmt == "raw":
        return 0, ""
    p = subprocess.run(["qemu-img", "check", "-f", fmt, path], capture_output=True, text=True)
    return p.returncode, p.stdout + p.stderr

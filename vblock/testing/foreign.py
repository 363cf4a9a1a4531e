"""Hand-made files in the formats vblock has no driver for, for tests that need no qemu-img.

``sample(fmt)`` returns the bytes of a small file whose header (or, for a fixed VHD and a DMG,
whose last 512 bytes) carries the marks ``vblock.block.probe`` looks for, filled out as the
format's specification lays it out. They are not complete images: only probing is meant to see
them, and no tool should get further than the header. ``FORMATS`` lists the names ``sample``
knows; ``vpc-fixed`` and ``vmdk-descriptor`` are second layouts of ``vpc`` and ``vmdk``.
``QEMU_IMG_CREATE`` says how ``qemu-img create`` makes the real thing, for the tests that have it.
"""

from __future__ import annotations

import struct

__all__ = ["FORMATS", "FORMAT_OF", "QEMU_IMG_CREATE", "sample", "vhd_footer"]

SIZE = 64 << 10  # bytes in every sample


def _pad(head: bytes, size: int = SIZE) -> bytes:
    return head.ljust(size, b"\0")


def vhd_footer(disk_size: int, disk_type: int = 2) -> bytes:
    """A 512-byte VHD footer (big-endian fields) with a correct checksum; type 2 = fixed."""
    f = bytearray(512)
    struct.pack_into(
        ">8sIIQI4sI4sQQIII",
        f,
        0,
        b"conectix",
        2,
        0x00010000,
        0xFFFFFFFFFFFFFFFF if disk_type == 2 else 512,
        0,
        b"vblk",
        0x00010000,
        b"Wi2k",
        disk_size,
        disk_size,
        0,
        disk_type,
        0,
    )
    struct.pack_into(">I", f, 64, ~sum(f) & 0xFFFFFFFF)
    return bytes(f)


def _qcow(version):
    return _pad(struct.pack(">4sIQIIQ", b"QFI\xfb", version, 0, 0, 16, 1 << 20))


def _vmdk():
    return _pad(struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, 2048, 128, 1, 0))


def _vmdk_descriptor():
    text = (
        b"# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\n"
        b'createType="monolithicFlat"\n\n# Extent description\nRW 2048 FLAT "disk-flat.vmdk" 0\n'
    )
    return text  # a descriptor is a small text file, not padded


def _vdi():
    banner = b"<<< QEMU VM Virtual Disk Image >>>\n".ljust(64, b"\0")
    return _pad(banner + struct.pack("<III", 0xBEDA107F, 0x00010001, 400))


def _vpc_dynamic():
    footer = vhd_footer(1 << 20, disk_type=3)
    return _pad(footer + b"cxsparse".ljust(1024, b"\0")) + footer


def _vpc_fixed():
    return bytes(SIZE) + vhd_footer(SIZE)


def _vhdx():
    return _pad(b"vhdxfile" + "vblock".encode("utf-16-le"))


def _luks():
    return _pad(struct.pack(">6sH32s", b"LUKS\xba\xbe", 1, b"aes"))


def _parallels():
    return _pad(struct.pack("<16sIIIII", b"WithouFreSpacExt", 2, 16, 1, 128, 1))


def _bochs():
    return _pad(
        struct.pack(
            "<32s16s16sII", b"Bochs Virtual HD Image", b"Redolog", b"Growing", 0x00020000, 512
        )
    )


def _cloop():
    magic = (
        b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
    )
    return _pad(magic.ljust(128, b"\0") + struct.pack(">II", 65536, 1))


def _dmg():
    trailer = bytearray(512)
    struct.pack_into(">4sII", trailer, 0, b"koly", 4, 512)
    return bytes(SIZE) + bytes(trailer)


_MAKERS = {
    "qcow": lambda: _qcow(1),
    "vmdk": _vmdk,
    "vmdk-descriptor": _vmdk_descriptor,
    "vdi": _vdi,
    "vpc": _vpc_dynamic,
    "vpc-fixed": _vpc_fixed,
    "vhdx": _vhdx,
    "luks": _luks,
    "parallels": _parallels,
    "bochs": _bochs,
    "cloop": _cloop,
    "dmg": _dmg,
}

FORMATS = tuple(_MAKERS)
#: sample name -> the format name probing must report
FORMAT_OF = {name: name.split("-")[0] for name in FORMATS}


def sample(fmt: str) -> bytes:
    """The bytes of a hand-made ``fmt`` file (a name in ``FORMATS``)."""
    return _MAKERS[fmt]()


#: sample name -> (qemu-img format, extra ``qemu-img create`` arguments) for a real image of it
QEMU_IMG_CREATE = {
    "qcow": ("qcow", []),
    "vmdk": ("vmdk", []),
    "vmdk-descriptor": ("vmdk", ["-o", "subformat=monolithicFlat"]),
    "vdi": ("vdi", []),
    "vpc": ("vpc", []),
    "vpc-fixed": ("vpc", ["-o", "subformat=fixed"]),
    "vhdx": ("vhdx", []),
    "luks": ("luks", ["--object", "secret,id=s0,data=vblock", "-o", "key-secret=s0,iter-time=10"]),
    "parallels": ("parallels", []),
}

"""The magic numbers of disk image formats: which format a file's bytes show, driver or not.

Drivers probe the formats vblock serves; this table also knows the formats it does not serve, so
that a qcow2 or vmdk file is never taken for a raw disk (opening it as raw would show the guest
the container's bytes, and writing would destroy the image). ``identify`` answers with a format
name (QEMU's names) or None; the registry turns a name with no driver into
``UnknownFormatError``. The magics were learnt from the formats' specifications and from images
that ``qemu-img create`` makes.

One entry per format, in ``MAGICS``: ``(name, test)`` where ``test(head, tail)`` sees ``head``,
the first bytes of the file (up to ``registry.PROBE_BYTES``), and ``tail``, its last
``TAIL_BYTES`` bytes (empty when the file is shorter). Entries are tried in order and the first
that matches wins; only the last two (a fixed VHD's footer, a DMG's trailer) look at ``tail``.
"""

from __future__ import annotations

import struct

__all__ = ["MAGICS", "TAIL_BYTES", "identify"]

TAIL_BYTES = 512  # a VHD footer, a DMG trailer


def _starts(prefix: bytes):
    def test(head, tail):
        return head.startswith(prefix)

    return test


def _qcow_version(head):
    """The version field of a qcow / qcow2 header ("QFI\\xfb", then a big-endian u32), or None."""
    if len(head) < 8 or not head.startswith(b"QFI\xfb"):
        return None
    return struct.unpack_from(">I", head, 4)[0]


def _qcow(head, tail):
    return _qcow_version(head) == 1


def _qcow2(head, tail):
    return _qcow_version(head) in (2, 3)


def _vmdk(head, tail):
    # Binary sparse extents ("KDMV" for VMDK 4, "COWD" for the older ESX 3 layout) or a text
    # descriptor, which is a whole image when its extents live in other files.
    if head.startswith((b"KDMV", b"COWD")):
        return True
    text = head.lstrip(b"\xef\xbb\xbf")  # a descriptor saved with a UTF-8 byte order mark
    if text.startswith(b"# Disk DescriptorFile"):
        return True
    return _descriptor_keys(text)


def _descriptor_keys(text):
    """A descriptor without its opening comment: text (no NUL before the end of the head) with a
    ``version=`` line and a ``createType=`` line, as VMware's tools and QEMU write them."""
    text = text.split(b"\0", 1)[0]
    if len(text) < 20 or any(b < 0x09 for b in text[:256]):
        return False
    lines = [line.strip() for line in text.splitlines()]
    return any(line.startswith(b"version=") for line in lines) and any(
        line.startswith(b"createType=") for line in lines
    )


_VDI_SIGNATURE = 0xBEDA107F  # little-endian u32 after the 64-byte text banner


def _vdi(head, tail):
    return len(head) >= 0x44 and struct.unpack_from("<I", head, 0x40)[0] == _VDI_SIGNATURE


def _bochs(head, tail):
    # 32-byte magic, 16-byte type, 16-byte subtype (each NUL-padded), then a LE u32 version.
    if len(head) < 512:
        return False
    magic, kind, subtype, version = struct.unpack_from("<32s16s16sI", head, 0)
    return (
        magic.rstrip(b"\0") == b"Bochs Virtual HD Image"
        and kind.rstrip(b"\0") == b"Redolog"
        and version in (0x00010000, 0x00020000)
    )


_CLOOP_V2 = (
    b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"
)


def _vpc_footer(block):
    """A VHD footer: the "conectix" cookie, a known disk type, and a checksum that agrees (the
    ones' complement of the byte sum with the checksum field taken as zero)."""
    if len(block) < 512 or not block.startswith(b"conectix"):
        return False
    disk_type, checksum = struct.unpack_from(">II", block, 60)
    if disk_type not in (2, 3, 4):  # fixed, dynamic, differencing
        return False
    total = sum(block[:64]) + sum(block[68:512])
    return (~total & 0xFFFFFFFF) == checksum


def _vpc(head, tail):
    # Dynamic and differencing VHDs start with a copy of the footer; a fixed VHD is the raw disk
    # followed by the footer alone, so its last 512 bytes are the only mark it carries.
    return head.startswith(b"conectix") or _vpc_footer(tail)


def _dmg(head, tail):
    # The "koly" trailer closes a UDIF image: magic, version 4, header size 512.
    return len(tail) == 512 and struct.unpack_from(">4sII", tail, 0) == (b"koly", 4, 512)


#: (format name, test) in the order they are tried. Formats with a magic at offset 0 first; the
#: ones known by their last bytes (a fixed VHD, a DMG) after every test of the first bytes.
MAGICS = (
    ("qed", _starts(b"QED\0")),
    ("qcow", _qcow),
    ("qcow2", _qcow2),
    ("vmdk", _vmdk),
    ("vdi", _vdi),
    ("vhdx", _starts(b"vhdxfile")),
    ("luks", _starts(b"LUKS\xba\xbe")),
    ("parallels", lambda head, tail: head.startswith((b"WithoutFreeSpace", b"WithouFreSpacExt"))),
    ("bochs", _bochs),
    ("cloop", _starts(_CLOOP_V2)),
    ("vpc", _vpc),
    ("dmg", _dmg),
)


def identify(head: bytes, tail: bytes = b"") -> str | None:
    """The format whose magic ``head`` (the file's first bytes) or ``tail`` (its last
    ``TAIL_BYTES`` bytes, empty for a shorter file) shows; None when none does (raw, perhaps)."""
    for name, test in MAGICS:
        if test(head, tail):
            return name
    return None

"""Helpers shared by the QED tests: make images, poke at their bytes, record fault points."""

import struct
import warnings

import vblock
from vblock.drivers.qed import format as fmt, tables
from vblock.errors import QemuCompatibilityWarning

KiB = 1024
MiB = 1 << 20


def create(path, size, **opts):
    """Create a QED image and return it open (read-write); QEMU-compatibility warnings about
    table sizes are expected in tests and silenced here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", QemuCompatibilityWarning)
        return vblock.create_image(str(path), "qed", size, **opts)


def reopen(path, **kw):
    return vblock.open_image(str(path), format="qed", **kw)


def header(path):
    with open(path, "rb") as f:
        return fmt.Header.unpack(f.read(64))


def poke_header(path, **changes):
    h = header(path).with_(**changes)
    with open(path, "r+b") as f:
        f.write(h.pack())


def read_table(path, offset, h=None):
    h = h or header(path)
    with open(path, "rb") as f:
        f.seek(offset)
        return tables.decode(f.read(h.cluster_size * h.table_size))


def poke_u64(path, offset, value):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))


def l1_entry_offset(path, index):
    return header(path).l1_table_offset + 8 * index


def l2_entry_offset(path, l1_index, l2_index):
    h = header(path)
    l2 = read_table(path, h.l1_table_offset, h)[l1_index]
    assert l2, "no L2 table there"
    return l2 + 8 * l2_index


def pattern(seed, n):
    """n bytes that identify ``seed`` (one byte value, as qemu-io -P)."""
    return bytes([seed & 0xFF]) * n


class Recorder:
    """Collects the driver's named fault points in order."""

    def __init__(self, img):
        self.names = []
        img.driver.events = self.names.append

    def __iter__(self):
        return iter(self.names)

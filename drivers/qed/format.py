"""QED on-disk format: the header codec, the geometry arithmetic and the open-time checks.

Sans-I/O: everything here takes bytes or numbers and returns values or raises ``ImageError``.
Field names are the spec's (``docs/interop/qed_spec.rst``); the reference note for QEMU's exact
behaviour is ``reference/qed-format.md`` (section numbers below point into it).

File layout (all integers little-endian)::

    +--------+---------------------------+----------------+---------+------------+---- ...
    | header | rest of header cluster(s) |   L1 table     | data /  | L2 tables  |
    | 64 B   | (backing filename at 64)  | table_size cl. | L2 ...  | appended   |
    +--------+---------------------------+----------------+---------+------------+---- ...
     0        header_size * cluster_size  l1_table_offset             EOF = allocation pointer

A guest offset splits into ``[ L1 index | L2 index | offset in cluster ]``; an L2 entry is 0
(unallocated: backing file or zeros), 1 (zero cluster, only in L2) or a cluster-aligned file offset.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace

from vblock.errors import ImageError

MAGIC = 0x00444551  # b"QED\0" read as a little-endian u32

# Incompatible feature bits (features): an unknown one means "refuse to open".
F_BACKING_FILE = 0x01
F_NEED_CHECK = 0x02
F_BACKING_FORMAT_NO_PROBE = 0x04
FEATURE_MASK = F_BACKING_FILE | F_NEED_CHECK | F_BACKING_FORMAT_NO_PROBE
COMPAT_FEATURE_MASK = 0  # none defined: unknown compat bits are kept
AUTOCLEAR_FEATURE_MASK = 0  # none defined: unknown autoclear bits are cleared by a writer

MIN_CLUSTER_SIZE = 4096  # bytes
MAX_CLUSTER_SIZE = 64 << 20  # bytes
MIN_TABLE_SIZE = 1  # clusters
MAX_TABLE_SIZE = 16  # clusters
DEFAULT_CLUSTER_SIZE = 65536
DEFAULT_TABLE_SIZE = 4
SECTOR = 512  # image_size is a multiple of this
MAX_BACKING_NAME = 4096  # bytes; QEMU reads the name into a PATH_MAX buffer (§2 step 10)

ZERO_CLUSTER = 1  # the L2 entry value of a zero cluster

#: The 64-byte header, packed, in the spec's field order.
HEADER = struct.Struct("<IIIIQQQQQII")
HEADER_SIZE = HEADER.size  # 64 bytes
FIELDS = (
    "magic",
    "cluster_size",
    "table_size",
    "header_size",
    "features",
    "compat_features",
    "autoclear_features",
    "l1_table_offset",
    "image_size",
    "backing_filename_offset",
    "backing_filename_size",
)


@dataclass(frozen=True)
class Header:
    """The QED header, CPU-side. Units: cluster_size, offsets and image_size in bytes;
    table_size and header_size in clusters."""

    magic: int = MAGIC
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    table_size: int = DEFAULT_TABLE_SIZE
    header_size: int = 1
    features: int = 0
    compat_features: int = 0
    autoclear_features: int = 0
    l1_table_offset: int = DEFAULT_CLUSTER_SIZE
    image_size: int = 0
    backing_filename_offset: int = 0
    backing_filename_size: int = 0

    @classmethod
    def unpack(cls, data) -> Header:
        """Decode the first 64 bytes of ``data`` (trailing bytes are ignored)."""
        if len(data) < HEADER_SIZE:
            raise ValueError(f"a QED header needs {HEADER_SIZE} bytes, got {len(data)}")
        return cls(*HEADER.unpack_from(data, 0))

    def pack(self) -> bytes:
        return HEADER.pack(*(getattr(self, name) for name in FIELDS))

    def pack_into(self, buf, offset=0) -> None:
        HEADER.pack_into(buf, offset, *(getattr(self, name) for name in FIELDS))

    def with_(self, **changes) -> Header:
        return replace(self, **changes)

    @property
    def has_backing(self) -> bool:
        return bool(self.features & F_BACKING_FILE)

    @property
    def need_check(self) -> bool:
        return bool(self.features & F_NEED_CHECK)


# -- geometry -----------------------------------------------------------------------------------


def is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def cluster_size_valid(cluster_size: int) -> bool:
    return is_power_of_2(cluster_size) and MIN_CLUSTER_SIZE <= cluster_size <= MAX_CLUSTER_SIZE


def table_size_valid(table_size: int) -> bool:
    return is_power_of_2(table_size) and MIN_TABLE_SIZE <= table_size <= MAX_TABLE_SIZE


def max_image_size(cluster_size: int, table_size: int) -> int:
    """QEMU's maximum image size in bytes, *including* its u64 wraparound (§1.5): entries per
    table squared times the cluster size, modulo 2**64. Large geometries wrap to 0."""
    entries = table_size * cluster_size // 8
    return (cluster_size * entries * entries) & ((1 << 64) - 1)


def max_image_size_wraps(cluster_size: int, table_size: int) -> bool:
    entries = table_size * cluster_size // 8
    return cluster_size * entries * entries >= 1 << 64


def image_size_valid(image_size: int, cluster_size: int, table_size: int) -> bool:
    return image_size % SECTOR == 0 and image_size <= max_image_size(cluster_size, table_size)


class Geometry:
    """Named arithmetic over one image's cluster and table sizes (qed.h's helpers)."""

    __slots__ = (
        "cluster_size",
        "table_size",
        "header_size",
        "cluster_bits",
        "table_entries",
        "table_bytes",
        "l2_bits",
        "l1_shift",
        "cluster_mask",
        "l2_mask",
        "l2_span",
        "header_bytes",
    )

    def __init__(self, cluster_size: int, table_size: int, header_size: int = 1):
        self.cluster_size = cluster_size  # bytes
        self.table_size = table_size  # clusters per table
        self.header_size = header_size  # clusters
        self.cluster_bits = cluster_size.bit_length() - 1
        self.table_bytes = table_size * cluster_size
        self.table_entries = self.table_bytes // 8
        self.l2_bits = self.table_entries.bit_length() - 1
        self.l1_shift = self.cluster_bits + self.l2_bits
        self.cluster_mask = cluster_size - 1
        self.l2_mask = self.table_entries - 1
        self.l2_span = 1 << self.l1_shift  # guest bytes mapped by one L2 table
        self.header_bytes = header_size * cluster_size

    @classmethod
    def of(cls, header: Header) -> Geometry:
        return cls(header.cluster_size, header.table_size, header.header_size)

    def l1_index(self, pos: int) -> int:
        return pos >> self.l1_shift

    def l2_index(self, pos: int) -> int:
        return (pos >> self.cluster_bits) & self.l2_mask

    def start_of_cluster(self, pos: int) -> int:
        return pos & ~self.cluster_mask

    def offset_into_cluster(self, pos: int) -> int:
        return pos & self.cluster_mask

    def bytes_to_clusters(self, nbytes: int) -> int:
        """Clusters needed to hold ``nbytes`` (rounded up). QEMU's helper of this name divides by
        cluster_size - 1 (§3.3); this one divides by the cluster size, as it should."""
        return (nbytes + self.cluster_mask) >> self.cluster_bits

    def cluster_offset_valid(self, offset: int, file_size: int) -> bool:
        """A data cluster offset: aligned, past the header, before the end of the file."""
        return offset & self.cluster_mask == 0 and self.header_bytes <= offset < file_size

    def table_offset_valid(self, offset: int, file_size: int) -> bool:
        """A table offset: its first and last clusters are valid cluster offsets. Python integers
        do not overflow, so QEMU's guard that rejects every table_size 1 image is not needed."""
        return self.cluster_offset_valid(offset, file_size) and (
            offset + self.table_bytes <= file_size
        )

    def round_down_to_cluster(self, nbytes: int) -> int:
        return nbytes & ~self.cluster_mask


# -- open-time validation (§2) ------------------------------------------------------------------


def _bad(path, field, message):
    return ImageError(path, field, message)


def probe(head: bytes) -> int:
    """Score 100 when ``head`` starts with the QED magic, however short it is: a QED file cut
    short is a corrupt QED image (``validate`` names the field), never a raw disk."""
    if len(head) >= 4 and struct.unpack_from("<I", head, 0)[0] == MAGIC:
        return 100
    return 0


def validate(data, file_length: int, path=None) -> Header:
    """Decode and check a header in QEMU's order (§2 steps 1-10); ``file_length`` is the image
    file's length in bytes. Raises ``ImageError`` naming the field at fault."""
    if len(data) < HEADER_SIZE:
        raise _bad(path, "header", "Failed to read QED header (file too short)")
    h = Header.unpack(data)
    if h.magic != MAGIC:
        raise _bad(path, "magic", "Image not in QED format")
    if h.features & ~FEATURE_MASK:
        raise _bad(path, "features", f"Unsupported QED features: {h.features & ~FEATURE_MASK:#x}")
    if not cluster_size_valid(h.cluster_size):
        raise _bad(path, "cluster_size", "QED cluster size is invalid")
    file_size = file_length & ~(h.cluster_size - 1)  # the allocation pointer (§2 step 5)
    if not table_size_valid(h.table_size):
        raise _bad(path, "table_size", "QED table size is invalid")
    if not image_size_valid(h.image_size, h.cluster_size, h.table_size):
        raise _bad(path, "image_size", "QED image size is invalid")
    geo = Geometry.of(h)
    if not geo.table_offset_valid(h.l1_table_offset, file_size):
        raise _bad(path, "l1_table_offset", "QED table offset is invalid")
    if h.header_size > 0xFFFFFFFF // h.cluster_size:
        raise _bad(path, "header_size", "QED header size is too large")
    if h.features & F_BACKING_FILE:
        end = h.backing_filename_offset + h.backing_filename_size
        if end > geo.header_bytes:
            raise _bad(path, "backing_filename_offset", "QED backing filename offset is invalid")
        if h.backing_filename_size >= MAX_BACKING_NAME:
            raise _bad(path, "backing_filename_size", "Failed to read backing filename (too long)")
    return h


def backing_name(h: Header, header_area, path=None) -> str | None:
    """The backing file name stored in ``header_area`` (bytes from file offset 0), or None. A
    name with a NUL byte names no file (the host refuses such paths): ``ImageError``."""
    if not h.features & F_BACKING_FILE:
        return None
    start = h.backing_filename_offset
    raw = bytes(header_area[start : start + h.backing_filename_size])
    if b"\0" in raw:
        raise _bad(path, "backing_filename", "QED backing filename contains a NUL byte")
    return raw.decode("utf-8", "surrogateescape")


# -- create (§10) -------------------------------------------------------------------------------


def round_up_size(size: int) -> int:
    return (size + SECTOR - 1) // SECTOR * SECTOR


def check_create(cluster_size: int, table_size: int, size: int) -> None:
    """Raise ValueError for a geometry or size that create refuses."""
    if not cluster_size_valid(cluster_size):
        raise ValueError(
            f"QED cluster size must be within range [{MIN_CLUSTER_SIZE}, {MAX_CLUSTER_SIZE}] "
            f"and power of 2 (got {cluster_size})"
        )
    if not table_size_valid(table_size):
        raise ValueError(
            f"QED table size must be within range [{MIN_TABLE_SIZE}, {MAX_TABLE_SIZE}] "
            f"and power of 2 (got {table_size})"
        )
    if max_image_size_wraps(cluster_size, table_size):
        raise ValueError(
            f"QED geometry cluster_size={cluster_size} table_size={table_size} is refused: "
            "QEMU's maximum image size wraps to 0 for it"
        )
    if size < 0 or size > max_image_size(cluster_size, table_size):
        raise ValueError(
            f"QED image size must be at most {max_image_size(cluster_size, table_size)} bytes "
            f"for this geometry (got {size})"
        )


def create_header(
    size: int,
    cluster_size: int = DEFAULT_CLUSTER_SIZE,
    table_size: int = DEFAULT_TABLE_SIZE,
    backing_file: str | None = None,
    backing_fmt: str | None = None,
) -> tuple[Header, bytes]:
    """The header and the leading bytes of the header cluster (header + backing name) for a new
    image; the rest of the file up to ``cluster_size * (1 + table_size)`` is zeros."""
    size = round_up_size(size)
    check_create(cluster_size, table_size, size)
    features = 0
    bfo = bfs = 0
    name = b""
    if backing_file:
        name = backing_file.encode("utf-8", "surrogateescape")
        if len(name) >= MAX_BACKING_NAME or HEADER_SIZE + len(name) > cluster_size:
            raise ValueError(f"backing file name too long ({len(name)} bytes)")
        features |= F_BACKING_FILE
        if backing_fmt == "raw":
            features |= F_BACKING_FORMAT_NO_PROBE
        bfo, bfs = HEADER_SIZE, len(name)
    h = Header(
        cluster_size=cluster_size,
        table_size=table_size,
        header_size=1,
        features=features,
        l1_table_offset=cluster_size,
        image_size=size,
        backing_filename_offset=bfo,
        backing_filename_size=bfs,
    )
    return h, h.pack() + name


def created_file_length(cluster_size: int, table_size: int) -> int:
    return cluster_size * (1 + table_size)

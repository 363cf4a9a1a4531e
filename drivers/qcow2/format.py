"""The qcow2 on-disk format, sans-I/O: the header and its extensions, table entries, limits.

Every number is big-endian. ``parse_header(cluster0, file_size, path)`` validates cluster 0 in the
order QEMU's open does (the messages say the same things) and returns a ``Header``; anything
wrong raises ``ImageError(path, field, message)`` naming the header field. Beyond QEMU, every
table a reader will follow (L1, refcount table, snapshot table) must lie inside the file: QEMU
reads zeros past the end of file, a hostile image must not make vblock read there.

``classify`` turns an L2 entry (and, with extended L2, its subcluster bitmap) into the cluster
types of the format's specification; ``compressed_extent`` decodes a compressed descriptor.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from vblock.errors import ImageError

MAGIC = b"QFI\xfb"
V2_HEADER_LENGTH = 72
V3_HEADER_LENGTH = 104

MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21

# incompatible feature bits
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = 0x1F
# compatible feature bits
COMPAT_LAZY_REFCOUNTS = 1 << 0
# autoclear feature bits
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

FEATURE_NAMES = {
    (0, 0): "dirty bit",
    (0, 1): "corrupt bit",
    (0, 2): "external data file",
    (0, 3): "compression type",
    (0, 4): "extended L2 entries",
}

# header extensions
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_NAMES = {0: "zlib", 1: "zstd"}

# limits (QEMU's, in bytes or entries)
MAX_REFTABLE_BYTES = 8 << 20
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20
MAX_L1_ENTRIES = (32 << 20) // 8
MAX_BACKING_NAME = 1023

# entry masks
L1_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1_RESERVED_MASK = 0x7F000000000001FF
L2_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2_RESERVED_MASK = 0x3F000000000001FE
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

# cluster (or subcluster) types, as the specification names them
UNALLOCATED = "unallocated"  # backing file or zeros
UNALLOCATED_ALLOC = "unallocated_alloc"  # ext L2: host cluster reserved, subcluster reads backing
ZERO_PLAIN = "zero_plain"
ZERO_ALLOC = "zero_alloc"
NORMAL = "normal"
COMPRESSED = "compressed"
INVALID = "invalid"

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # through header_length (104 bytes)


@dataclass
class Header:
    version: int
    backing_file_offset: int
    backing_file_size: int
    cluster_bits: int
    size: int  # virtual size as stored
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = 0
    backing_format: str | None = None
    backing_file: str | None = None
    data_file: str | None = None
    feature_table: dict = field(default_factory=dict)  # (type, bit) -> name
    has_bitmaps_ext: bool = False
    has_crypto_ext: bool = False

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def l2_entries(self) -> int:
        return self.cluster_size // (16 if self.extended_l2 else 8)

    @property
    def virtual_size(self) -> int:
        return self.size // 512 * 512

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def dirty(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DIRTY)

    @property
    def corrupt(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_CORRUPT)

    @property
    def lazy_refcounts(self) -> bool:
        return bool(self.compatible_features & COMPAT_LAZY_REFCOUNTS)

    @property
    def l1_needed(self) -> int:
        """L1 entries the virtual size needs."""
        span = self.cluster_size * self.l2_entries
        return -(-self.virtual_size // span)


def probe(head: bytes) -> int:
    """100 for a qcow2 header of version 2 or 3, else 0."""
    if len(head) >= 8 and head[:4] == MAGIC and struct.unpack_from(">I", head, 4)[0] in (2, 3):
        return 100
    return 0


def _err(path, fieldname, message):
    return ImageError(path, fieldname, message)


def parse_header(buf: bytes, file_size: int, path) -> Header:
    """Validate the header and extensions in ``buf`` (cluster 0, or as much of it as the file
    holds) of a file of ``file_size`` bytes; see the module docstring."""
    if len(buf) < V2_HEADER_LENGTH or buf[:4] != MAGIC:
        raise _err(path, "magic", "Image is not in qcow2 format")
    raw = bytes(buf[:V3_HEADER_LENGTH]).ljust(V3_HEADER_LENGTH, b"\0")
    (
        magic,
        version,
        bfo,
        bfs,
        cbits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
        incompat,
        compat,
        autoclear,
        rorder,
        hlen,
    ) = _HEADER.unpack(raw)
    if version not in (2, 3):
        raise _err(path, "version", f"Unsupported qcow2 version {version}")
    if not MIN_CLUSTER_BITS <= cbits <= MAX_CLUSTER_BITS:
        raise _err(path, "cluster_bits", f"Unsupported cluster size: 2^{cbits}")
    cs = 1 << cbits
    if version == 2:
        incompat = compat = autoclear = 0
        rorder = 4
        hlen = V2_HEADER_LENGTH
    elif hlen < V3_HEADER_LENGTH:
        raise _err(path, "header_length", "qcow2 header too short")
    if hlen > cs:
        raise _err(path, "header_length", "qcow2 header exceeds cluster size")
    if len(buf) < min(hlen, cs):
        raise _err(path, "header_length", "the file ends inside the qcow2 header")
    if bfo > cs:
        raise _err(path, "backing_file_offset", "Invalid backing file offset")
    ctype = buf[104] if hlen > 104 else 0
    if ctype not in COMPRESSION_NAMES:
        raise _err(path, "compression_type", f"qcow2: unknown compression type: {ctype}")
    if ctype == 0 and incompat & INCOMPAT_COMPRESSION:
        raise _err(
            path, "compression_type", "Compression type incompatible feature bit must not be set"
        )
    if ctype != 0 and not incompat & INCOMPAT_COMPRESSION:
        raise _err(
            path, "compression_type", "Compression type incompatible feature bit must be set"
        )
    h = Header(
        version,
        bfo,
        bfs,
        cbits,
        size,
        crypt,
        l1_size,
        l1_off,
        rt_off,
        rt_clusters,
        nb_snap,
        snap_off,
        incompat,
        compat,
        autoclear,
        rorder,
        hlen,
        ctype,
    )
    _parse_extensions(h, buf, path)
    unknown = incompat & ~INCOMPAT_KNOWN
    if unknown:
        names = [h.feature_table.get((0, b)) for b in range(64) if unknown >> b & 1]
        if all(names):
            raise _err(
                path, "incompatible_features", "Unsupported qcow2 feature(s): " + ", ".join(names)
            )
        raise _err(path, "incompatible_features", f"Unknown incompatible feature: {unknown:x}")
    if h.extended_l2 and cs // 32 < 512:
        raise _err(path, "cluster_bits", f"Unsupported subcluster size: {cs // 32}")
    if rorder > 6:
        raise _err(
            path, "refcount_order", "Reference count entry width too large; may not exceed 64 bits"
        )
    if rt_clusters == 0:
        raise _err(
            path, "refcount_table_clusters", "Image does not contain a reference count table"
        )
    _check_table(
        path,
        "refcount_table",
        rt_off,
        rt_clusters * cs,
        MAX_REFTABLE_BYTES,
        "Reference count table",
        cs,
        file_size,
    )
    if nb_snap > MAX_SNAPSHOTS:
        raise _err(path, "nb_snapshots", "Snapshot table too large")
    if nb_snap:
        _check_table(
            path,
            "snapshots_offset",
            snap_off,
            40 * nb_snap,
            MAX_SNAPSHOT_TABLE_BYTES,
            "Snapshot table",
            cs,
            file_size,
        )
    if l1_size > MAX_L1_ENTRIES:
        raise _err(path, "l1_size", "Active L1 table too large")
    if l1_size:
        _check_table(
            path, "l1_table_offset", l1_off, l1_size * 8, None, "Active L1 table", cs, file_size
        )
    if h.l1_needed > (1 << 31) - 1:
        raise _err(path, "size", "Image is too big")
    if l1_size < h.l1_needed:
        raise _err(path, "l1_size", "L1 table is too small")
    if crypt > 2:
        raise _err(path, "crypt_method", f"Unsupported encryption method {crypt}")
    if bfo:
        if bfs > min(MAX_BACKING_NAME, cs - bfo):
            raise _err(path, "backing_file_size", "Backing file name too long")
        name = bytes(buf[bfo : bfo + bfs])
        if len(name) < bfs:
            raise _err(
                path, "backing_file_offset", "the backing file name lies past the end of file"
            )
        h.backing_file = name.decode("utf-8", "surrogateescape")
    return h


def _check_table(path, fieldname, offset, nbytes, limit, what, cs, file_size):
    if limit is not None and nbytes > limit:
        raise _err(path, fieldname, f"{what} too large")
    if offset % cs:
        raise _err(path, fieldname, f"{what} offset invalid")
    if offset + nbytes > file_size:
        raise _err(
            path,
            fieldname,
            f"{what} at {offset:#x} ({nbytes} bytes) lies past the end of file ({file_size})",
        )


def _parse_extensions(h: Header, buf, path) -> None:
    cs = h.cluster_size
    end = h.backing_file_offset if h.backing_file_offset else min(cs, len(buf))
    pos = h.header_length
    while pos + 8 <= end:
        etype, elen = struct.unpack_from(">II", buf, pos)
        pos += 8
        if etype == EXT_END:
            return
        if elen > end - pos:
            raise _err(path, "header_extension", "Header extension too large")
        data = bytes(buf[pos : pos + elen])
        if etype == EXT_BACKING_FORMAT:
            if elen >= 16:
                raise _err(
                    path,
                    "backing_format",
                    f"ERROR: ext_backing_format: len={elen} too large (>=16)",
                )
            h.backing_format = data.decode("ascii", "replace") or None  # empty: probe
        elif etype == EXT_FEATURE_TABLE:
            for i in range(0, elen - 47, 48):
                kind, bit = data[i], data[i + 1]
                name = data[i + 2 : i + 48].split(b"\0", 1)[0].decode("utf-8", "replace")
                h.feature_table[(kind, bit)] = name
        elif etype == EXT_DATA_FILE:
            h.data_file = data.decode("utf-8", "surrogateescape")
        elif etype == EXT_BITMAPS:
            h.has_bitmaps_ext = True
        elif etype == EXT_CRYPTO:
            h.has_crypto_ext = True
        pos += (elen + 7) & ~7


# -- table entries --------------------------------------------------------------------------------
def classify(entry: int, bitmap: int | None, version: int, sub: int = 0):
    """The type of a standard L2 entry (``bitmap`` None), or of subcluster ``sub`` of an extended
    one, and its host offset (cluster-aligned for NORMAL/ZERO_ALLOC/UNALLOCATED_ALLOC, else 0)."""
    if entry & OFLAG_COMPRESSED:
        return COMPRESSED, 0
    host = entry & L2_OFFSET_MASK
    if bitmap is None:
        if entry & OFLAG_ZERO:
            if version < 3:
                return INVALID, host
            return (ZERO_ALLOC, host) if host else (ZERO_PLAIN, 0)
        return (NORMAL, host) if host else (UNALLOCATED, 0)
    alloc = bitmap & 0xFFFFFFFF
    zero = bitmap >> 32
    if host:
        if alloc & zero:
            return INVALID, host
        if zero >> sub & 1:
            return ZERO_ALLOC, host
        if alloc >> sub & 1:
            return NORMAL, host
        return UNALLOCATED_ALLOC, host
    if alloc:
        return INVALID, 0
    return (ZERO_PLAIN, 0) if zero >> sub & 1 else (UNALLOCATED, 0)


def compressed_extent(entry: int, cluster_bits: int):
    """(byte offset, byte count) of a compressed cluster's data, from its L2 entry."""
    x = 62 - (cluster_bits - 8)
    desc = entry & ((1 << 62) - 1)
    offset = desc & ((1 << x) - 1)
    nsectors = desc >> x
    return offset, (nsectors + 1) * 512 - (offset & 511)


# -- snapshots -------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    l1_table_offset: int
    l1_size: int
    id: str
    name: str
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    icount: int | None  # None: not recorded

    def info(self) -> dict:
        """``qemu-img info``'s JSON object for this snapshot."""
        d = {}
        if self.icount is not None:
            d["icount"] = self.icount
        d.update(
            {
                "vm-clock-nsec": self.vm_clock_nsec % 1_000_000_000,
                "name": self.name,
                "date-sec": self.date_sec,
                "date-nsec": self.date_nsec,
                "vm-clock-sec": self.vm_clock_nsec // 1_000_000_000,
                "id": self.id,
                "vm-state-size": self.vm_state_size,
            }
        )
        return d


_SNAP = struct.Struct(">QIHHIIQII")


def parse_snapshots(buf: bytes, count: int, version: int, path) -> list:
    """The ``count`` snapshot entries in ``buf`` (the table, read up to its limit)."""
    out = []
    pos = 0
    for i in range(count):
        if pos + _SNAP.size > len(buf):
            raise _err(
                path, "snapshots_offset", f"snapshot table entry {i} lies past the end of file"
            )
        (l1_off, l1_size, id_len, name_len, dsec, dnsec, clock, vmsize, extra) = _SNAP.unpack_from(
            buf, pos
        )
        if extra > MAX_SNAPSHOT_EXTRA:
            raise _err(
                path, "snapshots_offset", f"Too much extra metadata in snapshot table entry {i}"
            )
        if version >= 3 and extra < 16:
            raise _err(
                path,
                "snapshots_offset",
                f"Snapshot table entry {i} is incomplete (extra data too short)",
            )
        p = pos + _SNAP.size
        ex = bytes(buf[p : p + extra])
        p += extra
        if p + id_len + name_len > len(buf):
            raise _err(
                path, "snapshots_offset", f"snapshot table entry {i} lies past the end of file"
            )
        sid = bytes(buf[p : p + id_len]).decode("utf-8", "replace")
        p += id_len
        name = bytes(buf[p : p + name_len]).decode("utf-8", "replace")
        p += name_len
        icount = None
        if len(ex) >= 8:
            vmsize = struct.unpack_from(">Q", ex, 0)[0]
        if len(ex) >= 24:
            ic = struct.unpack_from(">Q", ex, 16)[0]
            icount = None if ic == (1 << 64) - 1 else ic
        out.append(Snapshot(l1_off, l1_size, sid, name, dsec, dnsec, clock, vmsize, icount))
        pos = (p + 7) & ~7
    return out


def snapshot_table_length(buf: bytes, count: int) -> int:
    """Bytes the ``count`` entries of ``buf`` occupy (for check); the table is assumed parsed."""
    pos = 0
    for _ in range(count):
        (_, _, id_len, name_len, _, _, _, _, extra) = _SNAP.unpack_from(buf, pos)
        pos = (pos + _SNAP.size + extra + id_len + name_len + 7) & ~7
    return pos

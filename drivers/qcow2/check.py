"""A read-only qcow2 consistency check: refcounts against the references, as qemu-img check.

``check(driver)`` walks every structure that references clusters (header, active L1 and its L2s
and data, each snapshot's L1 and the same walk, the snapshot table, the refcount table and its
blocks), counts the references per host cluster, and compares them with the stored refcounts for
every cluster below the end of the file: a stored count below the references is a corruption, one
above is a leak; a free, unreferenced cluster is fine. Entries that are wrong in themselves
(unaligned offsets, reserved bits, references past the end of file, COPIED on compressed entries,
bad subcluster bitmaps, COPIED that disagrees with the refcount in the active tables) count as one
corruption each. Returns qemu-img check's JSON fields. Nothing is written.

Memory is bounded by the file: one counter per host cluster of the file (plus the clusters a
reference past the end names are only counted as corruptions, not stored).
"""

from __future__ import annotations

import logging
import os
import struct
from collections import Counter

from . import format as fmt

_log = logging.getLogger("vblock.drivers.qcow2.check")


class _Scan:
    def __init__(self, drv):
        self.drv = drv
        self.h = drv.header
        self.cs = drv.cluster_size
        self.file_size = drv.file_size
        self.nclusters = -(-self.file_size // self.cs)
        self.refs = Counter()  # host cluster -> references
        self.corruptions = 0
        self.check_errors = 0
        self.allocated = 0
        self.fragmented = 0
        self.compressed = 0

    def corrupt(self, message):
        _log.info("%s: %s", self.drv.path, message)
        self.corruptions += 1

    def add(self, offset, nbytes):
        """One reference to every cluster [offset, offset+nbytes) touches; False past EOF."""
        if nbytes <= 0:
            return True
        # QEMU allows the last cluster to end past the end of file (a partly written one)
        if offset + nbytes - self.file_size >= self.cs:
            self.corrupt(
                f"counting reference for region exceeding the end of the file "
                f"(offset {offset:#x}, size {nbytes})"
            )
            return False
        first = offset // self.cs
        last = (offset + nbytes - 1) // self.cs
        for c in range(first, last + 1):
            self.refs[c] += 1
        return True

    def read(self, offset, nbytes):
        buf = bytearray(nbytes)
        got = self.drv.f.pread(buf, offset)
        return buf[:got]

    def walk_l1(self, l1_offset, l1_size, active):
        cs = self.cs
        if l1_size == 0:
            return
        if l1_offset % cs:
            self.corrupt(f"L1 table offset {l1_offset:#x} unaligned")
            return
        if not self.add(l1_offset, l1_size * 8):
            return
        raw = self.read(l1_offset, l1_size * 8)
        l1 = struct.unpack(f">{len(raw) // 8}Q", raw)
        for i, e in enumerate(l1):
            if e & fmt.L1_RESERVED_MASK:
                self.corrupt(f"L1 entry {i} has reserved bits set")
            off = e & fmt.L1_OFFSET_MASK
            if not off:
                continue
            if off % cs:
                self.corrupt(f"L2 table offset {off:#x} unaligned")
                continue
            if not self.add(off, cs):
                continue
            if active and bool(e & fmt.OFLAG_COPIED) != (self.stored(off // cs) == 1):
                self.corrupt(f"OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x}")
            self.walk_l2(off, active)

    def walk_l2(self, off, active):
        """Count one L2 table's references; fragmentation is judged within the table, as QEMU
        does."""
        cs = self.cs
        h = self.h
        raw = self.read(off, cs)
        table = struct.unpack(f">{len(raw) // 8}Q", raw)
        step = 2 if h.extended_l2 else 1
        last_host = None
        for i in range(0, len(table), step):
            e = table[i]
            bitmap = table[i + 1] if h.extended_l2 else None
            if e & fmt.OFLAG_COMPRESSED:
                if e & fmt.OFLAG_COPIED:
                    self.corrupt("copied flag must never be set for compressed clusters")
                if bitmap:
                    self.corrupt("compressed cluster has a subcluster bitmap")
                coff, csize = fmt.compressed_extent(e, h.cluster_bits)
                if active:
                    self.allocated += 1
                    self.compressed += 1
                    self.fragmented += 1
                self.add(coff, csize)
                continue
            host = e & fmt.L2_OFFSET_MASK
            reserved = fmt.L2_RESERVED_MASK & ~(1 if h.version >= 3 and not h.extended_l2 else 0)
            if e & reserved:
                self.corrupt(f"L2 entry {e:#x} has reserved bits set")
            if bitmap is not None and host and bitmap & 0xFFFFFFFF & (bitmap >> 32):
                self.corrupt("Allocated cluster has corrupted subcluster allocation bitmap")
            elif bitmap is not None and not host and bitmap & 0xFFFFFFFF:
                self.corrupt("Unallocated cluster has non-zero subcluster allocation bitmap")
            if not host:
                continue
            if host % cs:
                self.corrupt(f"Cluster allocation offset {host:#x} unaligned")
                continue
            if active:
                self.allocated += 1
                if last_host is not None and host != last_host + cs:
                    self.fragmented += 1
                last_host = host
            if self.add(host, cs) and active:
                if bool(e & fmt.OFLAG_COPIED) != (self.stored(host // cs) == 1):
                    self.corrupt(f"OFLAG_COPIED data cluster: l2_entry={e:x}")

    # -- stored refcounts --------------------------------------------------------------------------
    def load_refcounts(self):
        h = self.h
        cs = self.cs
        bits = h.refcount_bits
        per_block = cs * 8 // bits
        raw = self.read(h.refcount_table_offset, h.refcount_table_clusters * cs)
        rt = struct.unpack(f">{len(raw) // 8}Q", raw)
        self.stored_counts = {}
        self.refblocks = []
        for i, e in enumerate(rt):
            off = e & fmt.REFT_OFFSET_MASK
            if not off:
                continue
            if e & 0x1FF:
                self.corrupt(f"reftable entry {i} has reserved bits set")
            if off % cs or off + cs > self.file_size:
                self.corrupt(f"Refcount block offset {off:#x} invalid (reftable index {i})")
                continue
            self.refblocks.append(off)
            block = self.read(off, cs)
            base = i * per_block
            if base >= self.nclusters:
                continue
            n = min(per_block, self.nclusters - base)
            for k, v in enumerate(_unpack(block, bits, n)):
                if v:
                    self.stored_counts[base + k] = v

    def stored(self, cluster):
        return self.stored_counts.get(cluster, 0)


def _unpack(block, bits, n):
    if bits >= 8:
        width = bits // 8
        code = {1: "B", 2: "H", 4: "I", 8: "Q"}[width]
        return struct.unpack_from(f">{n}{code}", block, 0)
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    return [(block[k // per_byte] >> ((k % per_byte) * bits)) & mask for k in range(n)]


def check(drv) -> dict:
    s = _Scan(drv)
    h = s.h
    cs = s.cs
    s.load_refcounts()
    s.add(0, cs)  # the header
    s.walk_l1(h.l1_table_offset, h.l1_size, active=True)
    if h.nb_snapshots:
        for sn in drv.snapshots:
            s.walk_l1(sn.l1_table_offset, sn.l1_size, active=False)
        raw = s.read(
            h.snapshots_offset, min(fmt.MAX_SNAPSHOT_TABLE_BYTES, s.file_size - h.snapshots_offset)
        )
        s.add(h.snapshots_offset, fmt.snapshot_table_length(raw, h.nb_snapshots))
    s.add(h.refcount_table_offset, h.refcount_table_clusters * cs)
    for off in s.refblocks:
        s.add(off, cs)
    leaks = 0
    highest = -1
    for c in range(s.nclusters):
        stored = s.stored(c)
        ref = s.refs.get(c, 0)
        if stored or ref:
            highest = c
        if stored < ref:
            s.corrupt(f"ERROR cluster {c} refcount={stored} reference={ref}")
        elif stored > ref:
            _log.info("%s: Leaked cluster %d refcount=%d reference=%d", drv.path, c, stored, ref)
            leaks += 1
    for c in s.refs:
        if c >= s.nclusters:
            highest = max(highest, c)
    out = {
        "image-end-offset": (highest + 1) * cs,
        "total-clusters": -(-drv.size // cs),
        "check-errors": s.check_errors,
        "leaks": leaks,
        "corruptions": s.corruptions,
        "allocated-clusters": s.allocated,
        "fragmented-clusters": s.fragmented,
        "compressed-clusters": s.compressed,
        "format": "qcow2",
    }
    return out


def looks_metadata_preallocated(drv) -> bool:
    """QEMU's guess that an image was made with ``preallocation=metadata``: at least
    max(10/9 of, 2 more than) the clusters the host file really allocates have a non-zero
    refcount. QEMU's map then asks the host file where its holes are (they read as zeros)."""
    cs = drv.cluster_size
    real = os.fstat(drv.f.fd).st_blocks * 512 // cs
    threshold = max(real * 10 // 9, real + 2)
    s = _Scan(drv)
    s.load_refcounts()
    used = sum(1 for c in s.stored_counts if c < s.nclusters)
    return used >= threshold

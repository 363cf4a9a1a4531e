"""qcow2 -> QED in the same file: data clusters stay where they lie, only metadata is written.

``convert_in_place(path, drop_snapshots=False, progress=None)`` turns the qcow2 image at ``path``
into a QED image with the same cluster size (at least 4 KiB), table_size 4, the same virtual
size and the same backing file (name and, for raw, format). ``reclaim(path)`` finishes a
conversion that was interrupted after the switch (``convert_in_place`` on a QED file calls it).

The order of writes (every numbered step ends with a flush), so that at every moment the file is
either the original qcow2 or a QED that reads the same bytes:

1. **Phase A, still a valid qcow2.** Compressed clusters and clusters whose subclusters mix
   allocated, zero and unallocated (backing) data are written out whole into new clusters, then
   the QED L2 tables and the L1, all past the end of the file and past the final length ``N``
   clusters (see 3). qcow2 ignores what lies past its referenced clusters, so nothing it reads
   has changed.
2. **Phase B, the switch: one sector.** Sector 0 is read, its first 64 bytes replaced by the QED
   header (need-check set) and written back. An aligned 512-byte sector is the unit a disk writes
   atomically, so after a power loss it holds the old qcow2 header or the new QED one, never a
   mix; bytes 64-511 (old qcow2 fields) stay, and QED ignores them. The backing file name is
   where qcow2 stored it in cluster 0, and the QED header points at it.
3. **Phase C, a valid QED with leaks.** The old qcow2 metadata (refcount structures, L1/L2,
   snapshot tables) and the clusters it no longer references are holes. ``reclaim`` moves the
   tables into a window of whole tables after the header (evicting data clusters found there),
   then the data clusters past ``N`` into the remaining holes, then truncates the file to ``N``
   clusters, where ``N = 1 + table_size * tables + data clusters``. Each move copies first,
   flushes, then rewrites the one pointer (an L2 or L1 entry, or ``l1_table_offset`` in the
   header) and flushes: the old copy stays valid until its pointer changes. Last, need-check is
   cleared. A crash anywhere here leaves a QED that reads the same and carries need-check;
   ``reclaim`` starts again from whatever it finds.

Refused (nothing written): cluster sizes below 4 KiB (QED cannot address the data in place),
images too large for table_size 4, the corrupt bit, internal snapshots unless
``drop_snapshots`` (the refusal names them), and what the qcow2 driver refuses (encryption,
external data files). The caller holds no open of the image: ``convert_in_place`` takes the
write lock itself (``ImageLockedError`` while another process holds the image).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vblock.drivers.qed.reclaim import Writer, reclaim_file
from vblock.errors import ImageError, UnsupportedError

__all__ = ["Stats", "convert_in_place", "reclaim"]

TABLE_SIZE = 4  # QED table_size of converted images (QEMU's default)
SECTOR = 512


@dataclass
class Stats:
    """What a conversion did: ``bytes_written`` (metadata and materialized clusters, bytes),
    ``clusters_materialized`` (compressed or mixed clusters written out), ``clusters_moved``
    (by reclamation), ``final_size`` (bytes)."""

    bytes_written: int = 0
    clusters_materialized: int = 0
    clusters_moved: int = 0
    final_size: int = 0


def _lock(path, locking):
    from vblock.block import lock_permissions
    from vblock.hostio.lock import ImageLock

    if locking == "off":
        return None
    perm, shared = lock_permissions(False)
    return ImageLock(path, perm, shared, locking)


def convert_in_place(path, drop_snapshots=False, progress=None, locking="auto") -> Stats:
    """Convert the qcow2 image at ``path`` into QED in place (see the module docstring).
    ``progress(done, total)`` is called as clusters are mapped and moved. A QED file that
    carries need-check (a conversion interrupted after the switch) is finished instead."""
    from vblock.block.registry import probe_format

    lock = _lock(path, locking)
    try:
        fmt_name = probe_format(path)
        if fmt_name == "qed":
            return reclaim(path, progress=progress, _locked=True)
        if fmt_name != "qcow2":
            raise UnsupportedError(
                f"{path}: in-place conversion reads qcow2 images, not {fmt_name}"
            )
        return _convert(path, drop_snapshots, progress)
    finally:
        if lock is not None:
            lock.close()


def _convert(path, drop_snapshots, progress):
    import vblock
    from vblock.drivers.qed import format as qf
    from vblock.hostio import open_host_file

    img = vblock.open_image(path, format="qcow2", read_only=True, locking="off", cache="writeback")
    try:
        drv = img.driver
        h = drv.header
        cs = drv.cluster_size
        if cs < qf.MIN_CLUSTER_SIZE:
            raise UnsupportedError(
                f"{path}: cluster size {cs} is below QED's minimum of {qf.MIN_CLUSTER_SIZE}; an "
                f"in-place conversion cannot address the data (convert to a new file instead)"
            )
        if h.corrupt:
            raise ImageError(
                path,
                "incompatible_features",
                "the image is marked corrupt; run qemu-img check -r all first",
            )
        if drv.snapshots and not drop_snapshots:
            names = ", ".join(repr(s.name) for s in drv.snapshots)
            raise UnsupportedError(
                f"{path}: the image has internal snapshots ({names}), which QED "
                "cannot hold; pass --drop-snapshots to convert without them"
            )
        size = h.virtual_size
        if not qf.image_size_valid(size, cs, TABLE_SIZE):
            raise UnsupportedError(
                f"{path}: {size} bytes is too large for a QED image with "
                f"{cs}-byte clusters and table_size {TABLE_SIZE}"
            )
        if h.backing_file_offset and h.backing_file_offset < qf.HEADER_SIZE:
            raise UnsupportedError(f"{path}: the backing file name overlaps the QED header")
        plan = _plan(img, drv, size, progress)
    finally:
        img.close()

    stats = Stats(clusters_materialized=len(plan.materialize))
    f = open_host_file(path, direct=False, read_only=False)
    try:
        w = Writer(f)
        file_clusters = -(-f.size // cs)
        entries = TABLE_SIZE * cs // 8
        ntables = len(plan.l2) + 1
        n_final = 1 + TABLE_SIZE * ntables + len(plan.data_clusters) + len(plan.materialize)
        nxt = max(file_clusters, n_final)
        # Phase A: materialized clusters, then L2 tables, then the L1, all past the end.
        for g, data in plan.materialize.items():
            w.write(nxt * cs, data, "INPLACE_DATA")
            plan.entries[g] = nxt * cs
            nxt += 1
        l1 = [0] * entries
        for l1i in sorted(plan.l2):
            table = [0] * entries
            for g in plan.l2[l1i]:
                table[g % entries] = plan.entries[g]
            w.write(nxt * cs, struct.pack(f"<{entries}Q", *table), "INPLACE_L2")
            l1[l1i] = nxt * cs
            nxt += TABLE_SIZE
        l1_offset = nxt * cs
        w.write(l1_offset, struct.pack(f"<{entries}Q", *l1), "INPLACE_L1")
        w.flush()
        # Phase B: the switch.
        features = qf.F_NEED_CHECK
        if h.backing_file_offset:
            features |= qf.F_BACKING_FILE
            if h.backing_format == "raw":
                features |= qf.F_BACKING_FORMAT_NO_PROBE
        header = qf.Header(
            cluster_size=cs,
            table_size=TABLE_SIZE,
            header_size=1,
            features=features,
            l1_table_offset=l1_offset,
            image_size=size,
            backing_filename_offset=h.backing_file_offset if h.backing_file_offset else 0,
            backing_filename_size=h.backing_file_size if h.backing_file_offset else 0,
        )
        sector = bytearray(w.read(0, SECTOR))
        header.pack_into(sector, 0)
        w.write(0, bytes(sector), "INPLACE_SWITCH")
        w.flush()
        # Phase C: reclaim the old metadata.
        stats.clusters_moved, _ = reclaim_file(w, progress)
        stats.final_size = f.size
        stats.bytes_written = w.bytes_written
    finally:
        f.close()
    return stats


@dataclass
class _Plan:
    entries: dict  # guest cluster -> QED L2 entry (host offset or 1) for clusters that are not 0
    l2: dict  # QED L1 index -> guest clusters with a non-zero entry
    materialize: dict  # guest cluster -> bytes to write in a new cluster
    data_clusters: set  # host clusters kept in place


def _plan(img, drv, size, progress) -> _Plan:
    """Map every guest cluster below ``size`` to its QED L2 entry (see the module docstring)."""
    from vblock.drivers.qcow2 import format as q

    h = drv.header
    cs = drv.cluster_size
    entries_per_table = TABLE_SIZE * cs // 8
    nclusters = -(-size // cs)
    has_backing = drv.backing_filename is not None
    out = _Plan({}, {}, {}, set())
    l2n = h.l2_entries
    step = 2 if h.extended_l2 else 1
    plain = q.OFLAG_COMPRESSED | q.OFLAG_ZERO | q.L2_RESERVED_MASK
    for l1i in range(-(-nclusters // l2n)):
        base = l1i * l2n
        if progress is not None:
            progress(base, nclusters)
        table = drv._table(l1i)
        if table is None:
            continue
        for idx in range(min(l2n, nclusters - base)):
            entry = table[step * idx]
            bitmap = table[step * idx + 1] if step == 2 else None
            if not entry and not bitmap:
                continue  # unallocated: 0 in QED too
            g = base + idx
            if bitmap is None and not entry & plain:
                value = entry & q.L2_OFFSET_MASK  # the common case: a data cluster
                if not value:
                    continue
                _check_host(drv, value, g)
            else:
                value = _entry_for(drv, q, entry, bitmap, has_backing, g)
                if value is None:
                    continue
            if value == "copy":
                pos = g * cs
                out.materialize[g] = img.read(pos, min(cs, size - pos)).ljust(cs, b"\0")
            elif value != 1:
                if value // cs in out.data_clusters:  # two guest clusters on one host cluster
                    pos = g * cs
                    out.materialize[g] = img.read(pos, min(cs, size - pos)).ljust(cs, b"\0")
                    value = "copy"
                else:
                    out.data_clusters.add(value // cs)
            if value != "copy":
                out.entries[g] = value
            out.l2.setdefault(g // entries_per_table, []).append(g)
    if progress is not None:
        progress(nclusters, nclusters)
    return out


def _entry_for(drv, q, entry, bitmap, has_backing, g):
    """The QED entry for one guest cluster: None (0, unallocated), 1 (zero), a host offset, or
    "copy" (materialize a new cluster)."""
    if entry & q.OFLAG_COMPRESSED:
        return "copy"
    host = entry & q.L2_OFFSET_MASK
    if bitmap is None:
        kind, host = q.classify(entry, None, drv.header.version)
        if kind is q.NORMAL:
            _check_host(drv, host, g)
            return host
        if kind in (q.ZERO_PLAIN, q.ZERO_ALLOC):
            return 1
        if kind is q.INVALID:
            raise ImageError(
                drv.path, "l2_table", f"invalid L2 entry {entry:#x} for guest cluster {g}"
            )
        return None
    alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
    if (host and alloc & zero) or (not host and alloc):
        raise ImageError(
            drv.path, "l2_table", f"invalid subcluster bitmap {bitmap:#x} for guest cluster {g}"
        )
    full = 0xFFFFFFFF
    if host and alloc == full:
        _check_host(drv, host, g)
        return host
    if zero == full or (alloc == 0 and zero and not has_backing):
        return 1
    if alloc == 0 and zero == 0:
        return None
    return "copy"


def _check_host(drv, host, g):
    cs = drv.cluster_size
    if host % cs:
        raise ImageError(
            drv.path,
            "l2_table",
            f"Cluster allocation offset {host:#x} unaligned (guest cluster {g})",
        )
    if host >= drv.file_size:
        raise ImageError(
            drv.path,
            "l2_table",
            f"data cluster {host:#x} of guest cluster {g} lies past the end of file",
        )


# -- Phase C (drivers/qed/reclaim.py does the work) ------------------------------------------------
def reclaim(path, progress=None, _locked=False, locking="auto") -> Stats:
    """Finish a conversion interrupted after the switch: compact the QED image at ``path`` so
    that it holds only its header, tables and referenced data, then clear need-check. Works on
    any QED image with table_size >= 1 and header_size 1."""
    from vblock.hostio import open_host_file

    lock = None if _locked else _lock(path, locking)
    stats = Stats()
    try:
        f = open_host_file(path, direct=False, read_only=False)
        try:
            w = Writer(f)
            stats.clusters_moved, _ = reclaim_file(w, progress)
            stats.bytes_written = w.bytes_written
            stats.final_size = f.size
        finally:
            f.close()
    finally:
        if lock is not None:
            lock.close()
    return stats

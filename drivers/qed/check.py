"""Consistency check: what ``qemu-img check`` counts, computed correctly.

``scan`` walks the L1 table and every L2 table it reaches (``read_l2`` does the reading, so the
walk itself is sans-I/O) and returns a ``Scan``: qemu-img check's counters, the entries a repair
must zero, and the leaked clusters. Differences from QEMU (``reference/qed-format.md`` §9):

* leaks are counted exactly (QEMU's bitmap skips one index every cluster_size - 1 clusters and
  reports leaks that do not exist, §3.3);
* repair also reclaims leaks: the driver moves clusters from the end of the file into interior
  leaks (compact.py), truncates the trailing ones, and punches holes for any it could not fill.

Like QEMU: an invalid L1 or L2 entry is a corruption that repair zeroes (an L1 entry of 1 is
invalid); a cluster referenced twice is a corruption repair cannot fix; a table whose clusters are
already used is not descended; a table that fails to read is a check error.

``check_image`` runs a scan over an open image (``state.QedState``) and, asked to, the repair.
Contract: it runs on the caller's thread with no request in flight (the driver drains them
first, and open runs it before any request), blocks on I/O, and takes ``QedState.lock`` only to
drop the cached tables it rewrote. Write ordering: the need-check bit is set and flushed before
the first table is rewritten, so a crash during repair leads to another repair; zeroed entries
and moved clusters are flushed before the file is truncated; the bit is cleared (and flushed)
only once a final scan finds no corruption.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from . import compact
from .format import ZERO_CLUSTER, Geometry


@dataclass
class Scan:
    total_clusters: int = 0  # guest clusters: ceil(image_size / cluster_size)
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    corruptions: int = 0
    check_errors: int = 0
    fixable: int = 0  # corruptions that zeroing an entry repairs
    l1_fixes: list = field(default_factory=list)  # L1 indexes to zero
    l2_fixes: dict = field(default_factory=dict)  # L2 table offset -> [indexes to zero]
    leaked: list = field(default_factory=list)  # file cluster indexes nobody references
    used: bytearray = field(default_factory=bytearray)  # one byte per file cluster

    @property
    def leaks(self):
        return len(self.leaked)

    def as_dict(self, filename=None, corruptions_fixed=0, leaks_fixed=0):
        d = {
            "check-errors": self.check_errors,
            "corruptions": self.corruptions,
            "leaks": self.leaks,
            "corruptions-fixed": corruptions_fixed,
            "leaks-fixed": leaks_fixed,
            "total-clusters": self.total_clusters,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "format": "qed",
        }
        if filename is not None:
            d["filename"] = filename
        return d


def scan(geo: Geometry, l1_table_offset: int, image_size: int, l1, read_l2, file_size: int):
    """Check one image. ``l1`` is the L1 table; ``read_l2(offset)`` returns an L2 table or raises
    OSError; ``file_size`` is the file length rounded down to a cluster (bytes)."""
    cs = geo.cluster_size
    nclusters = file_size // cs
    s = Scan(total_clusters=-(-image_size // cs), used=bytearray(nclusters))
    used = s.used

    def mark(offset, count):
        """Mark ``count`` clusters from ``offset``; return how many were already marked."""
        first = offset // cs
        dup = 0
        for i in range(first, first + count):
            if used[i]:
                dup += 1
            else:
                used[i] = 1
        return dup

    mark(l1_table_offset, geo.table_size)
    for l1i, l2off in enumerate(l1):
        if l2off == 0:
            continue
        if not geo.table_offset_valid(l2off, file_size):
            s.corruptions += 1
            s.fixable += 1
            s.l1_fixes.append(l1i)
            continue
        dup = mark(l2off, geo.table_size)
        if dup:
            s.corruptions += dup
            continue
        try:
            l2 = read_l2(l2off)
        except OSError:
            s.check_errors += 1
            continue
        prev = None
        fixes = []
        for l2i, entry in enumerate(l2):
            if entry == 0 or entry == ZERO_CLUSTER:
                continue
            s.allocated_clusters += 1
            if prev is not None and entry != prev + cs:
                s.fragmented_clusters += 1
            prev = entry
            if not geo.cluster_offset_valid(entry, file_size):
                s.corruptions += 1
                s.fixable += 1
                fixes.append(l2i)
                continue
            if mark(entry, 1):
                s.corruptions += 1
        if fixes:
            s.l2_fixes[l2off] = fixes
    if s.check_errors == 0:
        s.leaked = [i for i in range(geo.header_size, nclusters) if not used[i]]
    return s


def leak_ranges(leaked, nclusters):
    """Split leaked cluster indexes into (trailing_from or None, [(start, count) interior runs]).
    ``trailing_from`` is the first index of the run of leaks that reaches the end of the file."""
    runs = []
    for i in leaked:
        if runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    trailing = None
    if runs and runs[-1][0] + runs[-1][1] == nclusters:
        trailing = runs.pop()[0]
    return trailing, [tuple(r) for r in runs]


def check_image(st, repair, needcheck, growth):
    """qemu-img check's counters for the open image ``st`` (``Scan.as_dict``). With ``repair`` on
    a read-write image: zero invalid entries, reclaim leaked clusters (fill interior ones from
    the end of the file, truncate, punch holes for any left), clear need-check. ``needcheck`` and
    ``growth`` are the image's ``needcheck.NeedCheck`` and ``growth.Growth``."""
    geo = st.geo
    h = st.header
    s = scan(geo, h.l1_table_offset, h.image_size, st.l1, st.tio.read, st.file_size)
    if not repair or st.read_only:
        return s.as_dict(st.path)
    corruptions_fixed = leaks_fixed = 0
    if s.l1_fixes or s.l2_fixes:
        needcheck.set_now()
    for l2off, idxs in s.l2_fixes.items():
        table = st.tio.read(l2off)
        for i in idxs:
            table[i] = 0
        st.tio.write_whole(l2off, table, "L2_REPAIR")
        corruptions_fixed += len(idxs)
    if s.l1_fixes:
        for i in s.l1_fixes:
            st.l1[i] = 0
        st.tio.write_whole(h.l1_table_offset, st.l1, "L1_REPAIR")
        corruptions_fixed += len(s.l1_fixes)
    with st.lock:
        st.forget_hosts()
    found = s
    leaks_found = s.leaks
    if s.leaked and s.corruptions == s.fixable:
        # Fill interior leaks with the clusters at the end of the file (compact.py), so that
        # nothing but a truncation is left to do.
        needcheck.set_now()
        compact.execute(st, s.leaked)
        s = scan(geo, h.l1_table_offset, h.image_size, st.l1, st.tio.read, st.file_size)
        if s.leaked and s.corruptions == s.fixable:  # holes no whole table fits in (reclaim.py)
            from . import reclaim

            reclaim.repair(st, growth)
            h = st.header
            s = scan(geo, h.l1_table_offset, h.image_size, st.l1, st.tio.read, st.file_size)
    nclusters = st.file_size // geo.cluster_size
    trailing, interior = leak_ranges(s.leaked, nclusters)
    for start, count in interior:
        try:
            st.f.discard(start * geo.cluster_size, count * geo.cluster_size)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTSUP):
                raise
    if trailing is not None:
        st.f.flush()
        st.file_size = trailing * geo.cluster_size
        growth.cut(st.file_size)
    st.f.flush()
    leaks_fixed = leaks_found - sum(n for _, n in interior)  # punched ones stay leaks
    if corruptions_fixed or leaks_fixed:
        # double-check, as qemu-img does after a repair
        after = scan(geo, h.l1_table_offset, h.image_size, st.l1, st.tio.read, st.file_size)
    else:
        after = s
    if after.corruptions == 0 and after.check_errors == 0:
        st.damaged = False
        needcheck.clear_now()
    result = after.as_dict(st.path, corruptions_fixed, leaks_fixed)
    result["corruptions-found"] = found.corruptions
    result["leaks-found"] = found.leaks
    return result

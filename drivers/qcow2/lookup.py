"""Translate a guest range into runs of one cluster type, sans-I/O.

``runs(h, get_l2, pos, length)`` yields ``Seg(kind, pos, n, host, entry)`` covering
[pos, pos+length): ``kind`` a cluster type of ``format`` (per subcluster with extended L2),
``host`` the file offset of ``pos`` for NORMAL, ZERO_ALLOC and UNALLOCATED_ALLOC runs (else 0),
``entry`` the L2 entry of a COMPRESSED run (one cluster at most) or of an INVALID one.
``get_l2(l1_index)`` returns the L2 table as a sequence of ints (two per guest cluster with
extended L2: entry, bitmap) or None for an unallocated L1 entry.

Runs of one type and contiguous host offsets are merged, up to the end of one L2 table, so a
caller issues one host read per run.
"""

from __future__ import annotations

from typing import NamedTuple

from . import format as fmt

_HOSTED = (fmt.NORMAL, fmt.ZERO_ALLOC, fmt.UNALLOCATED_ALLOC)
_ALL = 0xFFFFFFFF


class Seg(NamedTuple):
    kind: str
    pos: int
    n: int
    host: int
    entry: int


def _cluster_units(h, table, index, version):
    """[(kind, host, nbytes)] of one guest cluster, in order (one item for a uniform cluster)."""
    cs = h.cluster_size
    if table is None:
        return [(fmt.UNALLOCATED, 0, cs, 0)]
    if not h.extended_l2:
        entry = table[index]
        kind, host = fmt.classify(entry, None, version)
        return [(kind, host, cs, entry)]
    entry = table[2 * index]
    bitmap = table[2 * index + 1]
    if entry & fmt.OFLAG_COMPRESSED:
        return [(fmt.COMPRESSED, 0, cs, entry)]
    alloc, zero = bitmap & _ALL, bitmap >> 32
    if (alloc == _ALL and zero == 0) or (alloc == 0 and (zero == 0 or zero == _ALL)):
        kind, host = fmt.classify(entry, bitmap, version, 0)
        return [(kind, host, cs, entry)]
    sc = cs // 32
    out = []
    for sub in range(32):
        kind, host = fmt.classify(entry, bitmap, version, sub)
        if kind is fmt.INVALID:
            return [(kind, host, cs, entry)]
        out.append((kind, host + sub * sc if host else 0, sc, entry))
    return out


def runs(h, get_l2, pos: int, length: int):
    cs = h.cluster_size
    cbits = h.cluster_bits
    l2n = h.l2_entries
    version = h.version
    end = pos + length
    cur = None  # [kind, start, n, host, entry]
    while pos < end:
        cluster = pos >> cbits
        l1i, index = divmod(cluster, l2n)
        table = get_l2(l1i)
        if table is None:  # the whole L2 region is unallocated
            n = min(end, (l1i + 1) * l2n * cs) - pos
            if cur is not None and cur[0] is fmt.UNALLOCATED:
                cur[2] += n
            else:
                if cur is not None:
                    yield Seg(*cur)
                cur = [fmt.UNALLOCATED, pos, n, 0, 0]
            pos += n
            continue
        # the rest of this L2 table: clusters index.. while pos < end
        while pos < end and index < l2n:
            base = (pos >> cbits) << cbits
            upos = base
            for kind, host, nbytes, entry in _cluster_units(h, table, index, version):
                uend = upos + nbytes
                if uend <= pos:
                    upos = uend
                    continue
                start = max(upos, pos)
                n = min(uend, end) - start
                hoff = host + (start - upos) if kind in _HOSTED else 0
                if (
                    cur is not None
                    and cur[0] is kind
                    and kind is not fmt.COMPRESSED
                    and kind is not fmt.INVALID
                    and (kind not in _HOSTED or cur[3] + cur[2] == hoff)
                ):
                    cur[2] += n
                else:
                    if cur is not None:
                        yield Seg(*cur)
                    cur = [kind, start, n, hoff, entry]
                upos = uend
                if uend >= end:
                    break
            pos = min(base + cs, end)
            index += 1
        if cur is not None:  # runs are merged within one L2 table only
            yield Seg(*cur)
            cur = None
    if cur is not None:
        yield Seg(*cur)

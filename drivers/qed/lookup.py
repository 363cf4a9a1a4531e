"""Translate a guest range into a run of clusters of one kind, clamped to one L2 table.

Sans-I/O: the caller hands in the L2 table (or ``None`` when the L1 entry is 0) and gets back
``(kind, nbytes, host_offset)`` for the longest run starting at ``pos``:

* ``FOUND``: contiguous allocated clusters (each entry = previous + cluster_size); ``host_offset``
  is where ``pos`` lives in the image file. Only the first entry's validity decides, as in QEMU.
* ``ZERO``: zero clusters (L2 entry 1).
* ``UNALLOCATED``: L2 entries 0, or the whole rest of the L2 region when the L1 entry is 0.
* ``INVALID``: the first entry is not a valid cluster offset (the request fails with EINVAL).
"""

from __future__ import annotations

from .format import ZERO_CLUSTER, Geometry

FOUND = "found"
ZERO = "zero"
UNALLOCATED = "unallocated"
INVALID = "invalid"


def region_bytes(geo: Geometry, pos: int, length: int) -> int:
    """Bytes of [pos, pos+length) that lie in the L2 region holding ``pos``."""
    return min(length, geo.l2_span - (pos & (geo.l2_span - 1)))


def find_run(geo: Geometry, l2, pos: int, length: int, file_size: int):
    """The run at ``pos`` (see the module docstring), at most ``length`` bytes and never past the
    end of the L2 region. ``l2`` is the table (array of ints) or None for an L1 miss."""
    length = region_bytes(geo, pos, length)
    if l2 is None:
        return UNALLOCATED, length, None
    cs = geo.cluster_size
    index = (pos >> geo.cluster_bits) & geo.l2_mask
    in_cluster = pos & geo.cluster_mask
    want = (in_cluster + length + cs - 1) >> geo.cluster_bits  # clusters touched
    first = l2[index]
    n = 1
    if first == 0 or first == ZERO_CLUSTER:
        while n < want and l2[index + n] == first:
            n += 1
        kind = UNALLOCATED if first == 0 else ZERO
        return kind, min(length, n * cs - in_cluster), None
    if not geo.cluster_offset_valid(first, file_size):
        return INVALID, min(length, cs - in_cluster), first
    expect = first + cs
    while n < want and l2[index + n] == expect:
        n += 1
        expect += cs
    return FOUND, min(length, n * cs - in_cluster), first + in_cluster


def runs(geo: Geometry, get_l2, pos: int, length: int, file_size: int):
    """Yield (pos, kind, nbytes, host_offset) covering [pos, pos+length); ``get_l2(l1_index)``
    returns the table or None."""
    end = pos + length
    while pos < end:
        kind, n, host = find_run(geo, get_l2(pos >> geo.l1_shift), pos, end - pos, file_size)
        yield pos, kind, n, host
        pos += n

"""An independent reading of a QED file's layout (header, L1, L2) for the integrity tests: which
clusters are referenced, so file growth can be bounded. Deliberately separate from the driver."""

import struct

_HEADER = struct.Struct("<IIIIQQQQQII")


def referenced_bytes(path):
    """Bytes of the file that metadata accounts for: the header clusters, the L1 table, every L2
    table and every data cluster referenced (each counted once, clipped to the file)."""
    with open(path, "rb") as f:
        data = f.read()
    (_magic, cs, ts, hs, _feat, _compat, _auto, l1_off, _size, _bo, _bs) = _HEADER.unpack_from(data)
    table = cs * ts
    clusters = set(range(hs))
    clusters.update(range(l1_off // cs, l1_off // cs + ts))
    l1 = struct.unpack_from(f"<{table // 8}Q", data, l1_off)
    for l2_off in l1:
        if not l2_off or l2_off + table > len(data):
            continue
        clusters.update(range(l2_off // cs, l2_off // cs + ts))
        for entry in struct.unpack_from(f"<{table // 8}Q", data, l2_off):
            if entry > 1 and entry < len(data):
                clusters.add(entry // cs)
    return len(clusters) * cs

"""Hand-made qcow2 images, for tests and fuzzing that need no qemu-img.

``build(size, clusters, ...)`` returns the bytes of a consistent qcow2 image (refcounts right, so
``qemu-img check`` finds it clean) whose guest clusters are given by ``clusters``, a dict
guest cluster index -> one of:

* ``bytes`` (a whole cluster, or less, zero-padded): a NORMAL cluster;
* ``ZERO``: a zero cluster (v3: the zero flag; with extended L2 all zero bits);
* ``("compressed", data)``: a compressed cluster (deflate with QEMU's 4 KiB window, or zstd);
* ``("sub", data, alloc_mask, zero_mask)``: extended L2 only, a host cluster holding ``data``
  with the given subcluster bitmaps;
* ``("raw", entry)`` / ``("raw", entry, bitmap)``: an L2 entry as it is (for corrupt images).

Layout: cluster 0 the header (extensions and backing name after it), then the refcount table,
the refcount blocks, the L1 table, the L2 tables and the data, in that order. ``layout`` of the
returned ``Built`` says where each structure went, for tests that corrupt one.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field

ZERO = "zero"

__all__ = ["ZERO", "Built", "build"]


@dataclass
class Built:
    data: bytes
    layout: dict = field(default_factory=dict)


def _compress(data: bytes, ctype: int) -> bytes:
    if ctype == 0:
        c = zlib.compressobj(6, zlib.DEFLATED, -12, 9)
        return c.compress(data) + c.flush()
    import zstandard

    return zstandard.ZstdCompressor().compress(data)


def build(
    size: int,
    clusters: dict | None = None,
    *,
    cluster_bits: int = 16,
    version: int = 3,
    extended_l2: bool = False,
    compression_type: int = 0,
    backing: str | None = None,
    backing_fmt: str | None = None,
    lazy_refcounts: bool = False,
    dirty: bool = False,
    incompatible: int = 0,
) -> Built:
    clusters = clusters or {}
    cs = 1 << cluster_bits
    esize = 16 if extended_l2 else 8
    l2_entries = cs // esize
    nclusters = -(-size // cs)
    l1_size = max(1, -(-nclusters // l2_entries))
    # header + extensions
    hlen = 112 if version >= 3 else 72
    ext = b""
    if backing_fmt:
        f = backing_fmt.encode()
        ext += struct.pack(">II", 0xE2792ACA, len(f)) + f.ljust(-(-len(f) // 8) * 8, b"\0")
    ext += struct.pack(">II", 0, 0)
    bfo = bfs = 0
    name = backing.encode() if backing else b""
    if backing:
        bfo = hlen + len(ext)
        bfs = len(name)
    if hlen + len(ext) + len(name) > cs:
        raise ValueError("header does not fit in cluster 0")
    # plan: next free cluster
    nxt = [1]

    def take(n=1):
        c = nxt[0]
        nxt[0] += n
        return c

    rt_cluster = take()
    per_block = cs * 8 // 16
    # refblocks are placed after everything is known; reserve generously (recomputed below)
    l1_clusters = -(-l1_size * 8 // cs)
    body = {}  # host cluster -> bytes
    l1 = [0] * l1_size
    l2s = {}  # l1 index -> (host cluster, list of entries)
    data_plan = []

    # first pass: tables for every L1 index that has clusters
    needed_l1 = sorted({g // l2_entries for g in clusters})
    # reserve refblock area: at most enough for everything we could place
    estimate = 1 + 1 + 8 + l1_clusters + len(needed_l1) + len(clusters) * 2 + 8
    nblocks = -(-estimate // per_block) + 1
    rb_first = take(nblocks)
    l1_cluster = take(l1_clusters)
    for i in needed_l1:
        l2s[i] = (take(), [0] * (l2_entries * (2 if extended_l2 else 1)))
        l1[i] = (l2s[i][0] * cs) | (1 << 63)
    comp_pos = None  # byte offset where the next compressed stream goes
    for g in sorted(clusters):
        spec = clusters[g]
        i, k = divmod(g, l2_entries)
        table = l2s[i][1]
        e_idx = 2 * k if extended_l2 else k
        if isinstance(spec, (bytes, bytearray)):
            host = take()
            body[host] = bytes(spec).ljust(cs, b"\0")
            table[e_idx] = host * cs | (1 << 63)
            if extended_l2:
                table[e_idx + 1] = 0xFFFFFFFF
            comp_pos = None
        elif spec == ZERO:
            if extended_l2:
                table[e_idx + 1] = 0xFFFFFFFF << 32
            else:
                table[e_idx] = 1
        elif spec[0] == "compressed":
            blob = _compress(bytes(spec[1]).ljust(cs, b"\0"), compression_type)
            if comp_pos is None:
                comp_pos = take() * cs
            start = comp_pos
            end = start + len(blob)
            while end > nxt[0] * cs:
                take()
            for c in range(start // cs, -(-end // cs)):
                body.setdefault(c, bytes(cs))
            for j, b in enumerate(blob):  # write the stream across clusters
                c, o = divmod(start + j, cs)
                buf = bytearray(body[c])
                buf[o] = b
                body[c] = bytes(buf)
            x = 62 - (cluster_bits - 8)
            nsec = ((start + len(blob) - 1) >> 9) - (start >> 9)
            table[e_idx] = (1 << 62) | (nsec << x) | start
            data_plan.append((start, end))
            comp_pos = end
        elif spec[0] == "sub":
            host = take()
            body[host] = bytes(spec[1]).ljust(cs, b"\0")
            table[e_idx] = host * cs | (1 << 63)
            table[e_idx + 1] = (spec[3] << 32) | spec[2]
            comp_pos = None
        elif spec[0] == "raw":
            table[e_idx] = spec[1]
            if extended_l2 and len(spec) > 2:
                table[e_idx + 1] = spec[2]
        else:
            raise ValueError(f"unknown cluster spec {spec!r}")
    total = nxt[0]
    if total > nblocks * per_block:
        raise ValueError("image too large for the reserved refcount blocks")
    # refcounts: every cluster once, except that a cluster of compressed streams counts once per
    # stream touching it (as QEMU counts them)
    counts = [1] * total
    touching = {}
    for start, end in data_plan:
        for c in range(start // cs, -(-end // cs)):
            touching[c] = touching.get(c, 0) + 1
    for c, n in touching.items():
        counts[c] = n
    img = bytearray(total * cs)
    incompat = incompatible
    if extended_l2:
        incompat |= 1 << 4
    if compression_type:
        incompat |= 1 << 3
    if dirty:
        incompat |= 1
    compat = 1 if lazy_refcounts else 0
    hdr = struct.pack(
        ">4sIQIIQIIQQIIQ",
        b"QFI\xfb",
        version,
        bfo,
        bfs,
        cluster_bits,
        size,
        0,
        l1_size,
        l1_cluster * cs,
        rt_cluster * cs,
        1,
        0,
        0,
    )
    if version >= 3:
        hdr += struct.pack(">QQQII", incompat, compat, 0, 4, hlen)
        hdr += bytes([compression_type]) + bytes(7)
    img[: len(hdr)] = hdr
    img[len(hdr) : len(hdr) + len(ext)] = ext
    if backing:
        img[bfo : bfo + bfs] = name
    rt = [0] * (cs // 8)
    for b in range(nblocks):
        rt[b] = (rb_first + b) * cs
        block = [0] * per_block
        for k in range(per_block):
            c = b * per_block + k
            if c < total:
                block[k] = counts[c]
        struct.pack_into(f">{per_block}H", img, (rb_first + b) * cs, *block)
    struct.pack_into(f">{len(rt)}Q", img, rt_cluster * cs, *rt)
    struct.pack_into(f">{l1_size}Q", img, l1_cluster * cs, *l1)
    for host, table in l2s.values():
        struct.pack_into(f">{len(table)}Q", img, host * cs, *table)
    for c, blob in body.items():
        img[c * cs : (c + 1) * cs] = blob
    layout = {
        "refcount_table": rt_cluster * cs,
        "refcount_blocks": rb_first * cs,
        "l1_table": l1_cluster * cs,
        "l2_tables": {i: host * cs for i, (host, _) in l2s.items()},
    }
    return Built(bytes(img), layout)

"""Decompressing one qcow2 compressed cluster: raw deflate or zstd, exactly one cluster out.

``decompress(data, cluster_size, compression_type)`` returns ``cluster_size`` bytes or raises
``ValueError`` saying why (the caller names the image and the guest offset). Output is bounded by
``cluster_size`` whatever the input claims, so a hostile stream cannot make it allocate more.

* deflate (type 0, "zlib"): a raw RFC 1951 stream with no zlib header; QEMU writes a 4 KiB window,
  a 32 KiB window reads it too. Input left over once the cluster is full is ignored, as QEMU does.
* zstd (type 1): plain zstd frames with no length prefix; frames are decoded one after another
  until the cluster is full; bytes after that are ignored. The binding is ``zstandard``
  (python-zstandard): maintained for a decade, wheels for every platform CPython supports, and a
  decompressobj whose output can be capped.
"""

from __future__ import annotations

import zlib

DEFLATE = 0
ZSTD = 1
MAX_WINDOW = 8 << 20  # bytes: the largest zstd window accepted (a cluster is at most 2 MiB)


def decompress(data, cluster_size: int, compression_type: int) -> bytes:
    if compression_type == DEFLATE:
        return _inflate(data, cluster_size)
    if compression_type == ZSTD:
        return _unzstd(data, cluster_size)
    raise ValueError(f"unknown compression type {compression_type}")


def _inflate(data, cs):
    d = zlib.decompressobj(-15)
    try:
        out = d.decompress(bytes(data), cs)
    except zlib.error as exc:
        raise ValueError(f"deflate stream is corrupt: {exc}") from None
    if len(out) != cs:
        raise ValueError(f"deflate stream yields {len(out)} bytes, not a whole cluster of {cs}")
    return out


def _unzstd(data, cs):
    try:
        import zstandard
    except ImportError:  # pragma: no cover - a dependency; only a broken install lacks it
        raise ValueError("zstd-compressed clusters need the zstandard package") from None
    # The window cap bounds the decoder's memory whatever a frame header claims.
    dctx = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW)
    out = bytearray()
    try:
        with dctx.stream_reader(bytes(data), read_across_frames=True) as reader:
            while len(out) < cs:
                chunk = reader.read(cs - len(out))
                if not chunk:
                    break
                out += chunk
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd stream is corrupt: {exc}") from None
    if len(out) != cs:
        raise ValueError(f"zstd stream yields {len(out)} bytes, not a whole cluster of {cs}")
    return bytes(out)

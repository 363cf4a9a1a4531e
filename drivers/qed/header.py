"""Header updates: the only writer of the image's first block.

``format.py`` encodes and checks headers without I/O; this module puts a changed header in the
file. A header write rewrites the first ``meta_align`` bytes (a whole file-system block), keeping
everything after the 64-byte header (the backing file name, padding) as it is, and then replaces
``QedState.header``.

Contract: called from any thread that is allowed to block (open, a pool thread, the idle timer,
resize, repair, close). Writes are serialised by ``QedState.header_lock``, held across the I/O,
so concurrent changes (a resize and the need-check bit, say) never undo each other; no other
lock is held meanwhile. A header write is not flushed here: the caller decides when it must be
durable, and in what order against the data it guards (``needcheck.py``).
"""

from __future__ import annotations

from . import format as fmt


def write(st, **changes):
    """Rewrite the header with ``changes`` applied (``Header.with_`` fields);
    ``features_set`` / ``features_clear`` name feature bits to set or clear."""
    set_bits = changes.pop("features_set", 0)
    clear_bits = changes.pop("features_clear", 0)
    with st.header_lock:
        h = st.header
        if set_bits or clear_bits:
            changes["features"] = (h.features | set_bits) & ~clear_bits
        h = h.with_(**changes)
        st.event("HEADER_UPDATE")
        f = st.f
        buf = f.alloc(st.meta_align)
        if st.head_area is not None:
            buf[:] = st.head_area
        else:
            f.pread(buf, 0)
        h.pack_into(buf, 0)
        f.pwrite(buf, 0)
        if st.head_area is not None:
            st.head_area[:64] = buf[:64]
        st.header = h


def write_backing_name(st, raw, fmt_name):
    """Point the header at the backing file name ``raw`` (bytes; empty: no backing file), written
    right after the header in the same write and flushed. Features are recomputed: NO_PROBE only
    for a raw backing file, as ``qemu-img rebase -u`` does."""
    with st.header_lock:
        h = st.header
        features = h.features & ~(fmt.F_BACKING_FILE | fmt.F_BACKING_FORMAT_NO_PROBE)
        if raw:
            features |= fmt.F_BACKING_FILE
            if fmt_name == "raw":
                features |= fmt.F_BACKING_FORMAT_NO_PROBE
        new = h.with_(
            features=features,
            backing_filename_offset=fmt.HEADER_SIZE,
            backing_filename_size=len(raw),
        )
        f = st.f
        size = -(-(fmt.HEADER_SIZE + len(raw)) // st.meta_align) * st.meta_align
        area = f.alloc(size)
        f.pread(area, 0)
        new.pack_into(area, 0)
        area[fmt.HEADER_SIZE : fmt.HEADER_SIZE + len(raw)] = raw
        st.event("HEADER_UPDATE")
        f.pwrite(area, 0)
        f.flush()
        if st.head_area is not None:
            n = min(len(st.head_area), len(area))
            st.head_area[:n] = area[:n]
        st.header = new

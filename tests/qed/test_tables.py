"""Table codec (drivers/qed/tables.py)."""

import struct

from hypothesis import given
from hypothesis import strategies as st

from vblock.drivers.qed import tables

u64 = st.integers(0, 2**64 - 1)


@given(st.lists(u64, max_size=64))
def test_round_trip_is_little_endian(values):
    data = tables.encode(values)
    assert data == struct.pack(f"<{len(values)}Q", *values)
    assert list(tables.decode(data)) == values


@given(st.integers(0, 511), st.integers(1, 512), st.sampled_from([512, 4096, 65536]))
def test_slice_bounds_cover_and_align(first, span, align):
    entries = 512  # a 4 KiB table
    last = min(entries, first + span)
    start, end = tables.slice_bounds(first, last, entries, align)
    assert start <= first and last <= end <= entries
    eff = min(align, entries * 8)
    assert (start * 8) % eff == 0
    assert (end * 8) % eff == 0 or end == entries


@given(
    st.lists(u64, min_size=512, max_size=512),
    st.dictionaries(st.integers(0, 511), u64, min_size=1, max_size=8),
)
def test_encode_slice_applies_overlay_without_touching_table(values, overlay):
    table = tables.decode(tables.encode(values))
    first, last = min(overlay), max(overlay) + 1
    off, data = tables.encode_slice(table, first, last, 512, overlay)
    assert list(table) == values
    merged = list(values)
    for i, v in overlay.items():
        merged[i] = v
    assert data == tables.encode(merged)[off : off + len(data)]
    assert off % 512 == 0 and len(data) % 512 == 0


def test_new_table_is_zero():
    assert list(tables.new_table(4)) == [0, 0, 0, 0]

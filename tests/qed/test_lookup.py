"""Guest range -> runs (drivers/qed/lookup.py)."""

from hypothesis import given
from hypothesis import strategies as st

from vblock.drivers.qed import format as fmt
from vblock.drivers.qed import lookup

G = fmt.Geometry(4096, 1)  # 512 entries per table, 2 MiB per L2
FILE = 1 << 30


def _table(entries):
    t = [0] * G.table_entries
    for i, v in entries.items():
        t[i] = v
    return t


def test_l1_miss_is_unallocated_to_region_end():
    assert lookup.find_run(G, None, 4096, 10 << 20, FILE) == (
        lookup.UNALLOCATED,
        (2 << 20) - 4096,
        None,
    )


def test_contiguous_found_run_merges():
    t = _table({0: 8192, 1: 12288, 2: 16384, 3: 40960})
    assert lookup.find_run(G, t, 512, 5 * 4096, FILE) == (lookup.FOUND, 3 * 4096 - 512, 8192 + 512)
    assert lookup.find_run(G, t, 3 * 4096, 4096, FILE) == (lookup.FOUND, 4096, 40960)


def test_zero_and_unallocated_runs():
    t = _table({1: 1, 2: 1, 3: 8192})
    assert lookup.find_run(G, t, 0, 1 << 20, FILE) == (lookup.UNALLOCATED, 4096, None)
    assert lookup.find_run(G, t, 4096, 1 << 20, FILE) == (lookup.ZERO, 8192, None)


def test_invalid_first_entry():
    t = _table({0: 4097, 1: FILE, 2: 0})
    assert lookup.find_run(G, t, 0, 8192, FILE)[0] == lookup.INVALID
    assert lookup.find_run(G, t, 4096, 8192, FILE)[0] == lookup.INVALID
    # inside the header
    assert lookup.find_run(G, _table({0: 0x0}), 0, 4096, FILE)[0] == lookup.UNALLOCATED
    t2 = _table({0: 2 * 4096})
    assert lookup.find_run(G, t2, 0, 4096, FILE)[0] == lookup.FOUND


@given(
    st.dictionaries(
        st.integers(0, 511), st.sampled_from([0, 1, 8192, 12288, 16384, 4097]), max_size=40
    ),
    st.integers(0, (2 << 20) - 512),
    st.integers(1, 4 << 20),
)
def test_runs_tile_the_range_and_agree_with_entries(entries, pos, length):
    pos = pos // 512 * 512
    t = _table(entries)
    end = pos + length
    covered = pos
    for start, kind, n, host in lookup.runs(G, lambda i: t if i == 0 else None, pos, length, FILE):
        assert start == covered and n > 0
        covered += n
        if start >> G.l1_shift != pos >> G.l1_shift:
            assert kind == lookup.UNALLOCATED
            continue
        # the run never crosses a region boundary
        assert (start >> G.l1_shift) == ((start + n - 1) >> G.l1_shift)
        base = start - start % 4096
        for c in range(base, start + n, 4096):
            e = t[(c >> 12) & 511]
            if kind == lookup.ZERO:
                assert e == 1
            elif kind == lookup.UNALLOCATED:
                assert e == 0
            elif kind == lookup.FOUND:
                assert e == host - start % 4096 + (c - base)
    assert covered == end

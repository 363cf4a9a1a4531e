"""check.scan on hand-built tables, and leak range splitting (drivers/qed/check.py)."""

from vblock.drivers.qed import check, tables
from vblock.drivers.qed import format as fmt

G = fmt.Geometry(4096, 1)  # header 0, L1 at cluster 1
L1_OFF = 4096


def _scan(l1, l2s, file_clusters):
    return check.scan(G, L1_OFF, 8 << 20, l1, lambda off: l2s[off], file_clusters * 4096)


def _t(entries):
    t = tables.new_table(G.table_entries)
    for i, v in entries.items():
        t[i] = v
    return t


def test_clean_image():
    l1 = _t({0: 2 * 4096})
    s = _scan(l1, {2 * 4096: _t({0: 3 * 4096, 1: 4 * 4096, 2: 1})}, 5)
    assert (s.corruptions, s.leaks, s.check_errors) == (0, 0, 0)
    assert s.allocated_clusters == 2 and s.fragmented_clusters == 0
    assert s.total_clusters == (8 << 20) // 4096


def test_leaks_are_counted_exactly_even_past_cs_minus_1_clusters():
    # QEMU over-counts above cluster_size - 1 file clusters (§3.3); we do not.
    n = 5000
    l2s = {}
    l1 = tables.new_table(G.table_entries)
    data = 2
    for l1i in range(10):
        l2off = data * 4096
        data += 1
        entries = {}
        for i in range(512):
            if data >= n:
                break
            entries[i] = data * 4096
            data += 1
        l1[l1i] = l2off
        l2s[l2off] = _t(entries)
        if data >= n:
            break
    s = _scan(l1, l2s, n)
    assert s.leaks == 0 and s.corruptions == 0
    s = _scan(l1, l2s, n + 3)
    assert s.leaked == [n, n + 1, n + 2]


def test_invalid_entries_are_fixable_corruptions():
    l1 = _t({0: 2 * 4096, 1: 1, 2: 4097, 3: 99 * 4096})
    s = _scan(l1, {2 * 4096: _t({0: 3 * 4096, 1: 4095, 2: 50 * 4096, 3: 0})}, 4)
    assert s.corruptions == 5 and s.fixable == 5
    assert s.l1_fixes == [1, 2, 3]
    assert s.l2_fixes == {2 * 4096: [1, 2]}
    assert s.allocated_clusters == 3  # invalid entries count as allocated, as in QEMU


def test_duplicates_are_unfixable_and_shared_tables_not_descended():
    l1 = _t({0: 2 * 4096, 1: 2 * 4096})
    s = _scan(l1, {2 * 4096: _t({0: 3 * 4096, 1: 3 * 4096})}, 4)
    assert s.corruptions == 2 and s.fixable == 0  # one duplicate data, one duplicate table


def test_table_read_error_is_a_check_error():
    l1 = _t({0: 2 * 4096})

    def boom(off):
        raise OSError(5, "EIO")

    s = check.scan(G, L1_OFF, 8 << 20, l1, boom, 4 * 4096)
    assert s.check_errors == 1 and s.leaked == []


def test_leak_ranges():
    assert check.leak_ranges([], 10) == (None, [])
    assert check.leak_ranges([3, 4, 7, 8, 9], 10) == (7, [(3, 2)])
    assert check.leak_ranges([3, 5], 10) == (None, [(3, 1), (5, 1)])


def test_as_dict_uses_qemu_names():
    d = check.Scan(total_clusters=4).as_dict("x.qed")
    assert {
        "check-errors",
        "corruptions",
        "leaks",
        "corruptions-fixed",
        "leaks-fixed",
        "total-clusters",
        "allocated-clusters",
        "fragmented-clusters",
        "filename",
        "format",
    } <= set(d)

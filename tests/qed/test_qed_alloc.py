"""Allocation planning (drivers/qed/alloc.py)."""

from hypothesis import given, strategies as st

from vblock.drivers.qed import alloc, format as fmt

G = fmt.Geometry(4096, 2)


@given(st.integers(0, G.l2_span // 512 - 1), st.integers(1, 64), st.integers(3, 1000),
       st.booleans(), st.booleans())
def test_plan(sector, nsectors, file_clusters, zero, need_table):
    pos = sector * 512
    length = min(nsectors * 512, G.l2_span - pos)
    fs = file_clusters * 4096
    p = alloc.plan(G, fs, pos, length, zero, need_table)
    assert p.cluster_start <= pos < p.cluster_start + 4096
    assert p.cluster_start + p.nclusters * 4096 >= pos + length
    assert p.cluster_start + (p.nclusters - 1) * 4096 < pos + length
    entries = p.entries(G)
    assert len(entries) == p.nclusters
    if zero:
        assert p.host_offset is None and set(entries.values()) == {1}
    else:
        assert p.host_offset == fs  # data first, at the end of file
        assert sorted(entries.values()) == [fs + i * 4096 for i in range(p.nclusters)]
    if need_table:
        assert p.l2_offset == fs + (0 if zero else p.nclusters * 4096)  # table after data
        assert p.file_size == p.l2_offset + G.table_bytes
    else:
        assert p.l2_offset is None
    head_pos, head_len = p.head
    tail_pos, tail_len = p.tail(G)
    assert head_pos + head_len == pos and tail_pos == pos + length
    assert head_len + length + tail_len == p.nclusters * 4096

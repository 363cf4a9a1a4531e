"""Allocation planning (drivers/qed/alloc.py), and the table writer and shared flush that carry
the plans out (writer.TableWriter.update, .ordered_flush) driven by hand."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vblock
from tests.qed.qed_helpers import MiB, create
from vblock.drivers.qed import alloc, cache
from vblock.drivers.qed import format as fmt
from vblock.future import Future

G = fmt.Geometry(4096, 2)


@given(
    st.integers(0, G.l2_span // 512 - 1),
    st.integers(1, 64),
    st.integers(3, 1000),
    st.booleans(),
    st.booleans(),
)
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


# -- the table writer and the shared flush, driven by hand -----------------------------------------


class _HeldFile:
    """Wraps a HostFile: table writes and flushes return futures the test completes."""

    def __init__(self, real, meta_align):
        self.real = real
        self.meta_align = meta_align
        self.writes = []  # (offset, bytes, future)
        self.flushes = []

    def __getattr__(self, name):
        return getattr(self.real, name)

    def submit_write(self, offset, buffers):
        fut = Future()
        self.writes.append((offset, b"".join(bytes(b) for b in buffers), fut))
        return fut

    def submit_flush(self):
        fut = Future()
        self.flushes.append(fut)
        return fut


@pytest.fixture
def held(scratch):
    img = create(scratch / "w.qed", 8 * MiB, cluster_size=4096, table_size=2)
    img.write(0, b"\x01" * 4096)  # table 0 exists and is cached
    drv = img.driver
    entry = drv.cache.get(drv.l1[0])
    real = drv.f
    drv.f = _HeldFile(real, drv.state.meta_align)
    yield drv, entry
    drv.f = real
    img.close()


def test_updates_queued_during_a_write_go_out_as_one_write(held):
    drv, entry = held
    done = []
    drv.writer.update(entry, {10: 4096 * 40}, "L2_UPDATE", done.append)
    assert entry.state == cache.WRITING and len(drv.f.writes) == 1
    for i in range(11, 20):  # arrive while the first write is in flight
        drv.writer.update(entry, {i: 4096 * (30 + i)}, "L2_UPDATE", done.append)
    assert len(drv.f.writes) == 1 and len(entry.queued) == 9
    assert entry.table[11] == 0  # not visible before it is written
    drv.f.writes[0][2].set_result(4096)
    assert done == [None]
    assert entry.table[10] == 4096 * 40
    assert len(drv.f.writes) == 2 and entry.state == cache.WRITING  # one write for nine
    offset, data, fut = drv.f.writes[1]
    assert offset == entry.offset and len(data) == drv.state.meta_align
    fut.set_result(len(data))
    assert done == [None] * 10
    assert entry.state == cache.CLEAN and entry.queued == {}
    assert [entry.table[i] for i in range(11, 20)] == [4096 * (30 + i) for i in range(11, 20)]


def test_inline_allocation_counts_as_in_flight_until_both_writes_are_over(held):
    """close and check wait for the tracked requests (``QedState.inflight``): an inline allocation
    is one from its claim until its data write and its table update have both completed,
    whichever completes last, and its entry becomes visible only then."""
    drv, entry = held
    assert drv.state.inflight == 0
    fut = drv.submit_write(4096 * 7, [drv.f.alloc(4096)])
    data, table = sorted(drv.f.writes, key=lambda w: w[0] == entry.offset)  # data first
    assert table[0] == entry.offset and drv.state.inflight == 1 and not fut.done()
    table[2].set_result(4096)
    assert drv.state.inflight == 1 and not fut.done()
    assert entry.table[7] == 0  # data still in flight
    data[2].set_result(4096)
    assert fut.result() == 4096 and drv.state.inflight == 0 and entry.table[7] == data[0]


def test_next_batch_is_written_before_the_finished_batch_completes_its_requests(held):
    """Completing a batch's requests runs their callbacks (often the next requests): the table's
    next write must not wait for them."""
    drv, entry = held
    writes_seen = []
    drv.writer.update(
        entry, {10: 4096 * 40}, "L2_UPDATE", lambda err: writes_seen.append(len(drv.f.writes))
    )
    drv.writer.update(entry, {11: 4096 * 41}, "L2_UPDATE", lambda err: None)  # queued behind it
    drv.f.writes[0][2].set_result(4096)
    assert writes_seen == [2]  # the second write was out when the first batch's callback ran
    drv.f.writes[1][2].set_result(4096)
    assert entry.state == cache.CLEAN and entry.table[11] == 4096 * 41


def test_failed_table_write_fails_its_batch_and_keeps_the_table(held):
    drv, entry = held
    done = []
    drv.writer.update(entry, {10: 4096 * 40}, "L2_UPDATE", done.append)
    drv.f.writes[0][2].set_exception(OSError(5, "EIO"))
    assert isinstance(done[0], OSError) and entry.table[10] == 0
    assert entry.state == cache.CLEAN


def test_concurrent_ordered_flushes_share_one_flush(held):
    drv, _ = held
    done = []
    drv.writer.ordered_flush(done.append)
    assert len(drv.f.flushes) == 1
    for _ in range(4):  # their data completed after the first flush started: they need another
        drv.writer.ordered_flush(done.append)
    assert len(drv.f.flushes) == 1
    drv.f.flushes[0].set_result(None)
    assert done == [None] and len(drv.f.flushes) == 2
    drv.f.flushes[1].set_result(None)
    assert done == [None] * 5 and len(drv.f.flushes) == 2


def test_idle_clear_waits_for_allocations_in_flight(held):
    drv, _ = held
    path = drv.path
    fut = drv.submit_write(64 * 4096, [memoryview(bytearray(4096))])  # allocates, inline
    # No backing file: the data write and its L2 update go out together, both held.
    assert len(drv.f.writes) == 2
    drv.needcheck.idle_clear()
    assert header_need_check(path)  # an allocation is in flight: the bit stays
    drv.f.writes[1][2].set_result(drv.state.meta_align)  # the L2 update lands first
    assert not fut.done()
    drv.needcheck.idle_clear()
    assert header_need_check(path)
    drv.f.writes[0][2].set_result(4096)  # then the data
    assert fut.result() == 4096
    drv.needcheck.idle_clear()
    assert not header_need_check(path)


def header_need_check(path):
    with open(path, "rb") as f:
        return fmt.Header.unpack(f.read(64)).need_check


# -- allocation without a backing file: data and table update together, hidden until both land ----


def _alloc(drv, cluster):
    """Start an inline allocating write of one 4 KiB cluster; returns (future, data write, table
    write) with both writes held."""
    before = len(drv.f.writes)
    fut = drv.submit_write(cluster * 4096, [memoryview(bytearray(b"\x07" * 4096))])
    new = drv.f.writes[before:]
    l2 = drv.cache.get(drv.l1[0]).offset
    in_table = [w for w in new if l2 <= w[0] < l2 + drv.geo.table_bytes]
    data = [w for w in new if w not in in_table]
    assert len(data) == 1 and len(data[0][1]) == 4096
    return fut, data[0], in_table[0] if in_table else None


def test_new_clusters_stay_hidden_until_data_and_table_land(held):
    drv, entry = held
    fut, data, table = _alloc(drv, 64)
    assert table is not None  # both writes are out at once
    table[2].set_result(len(table[1]))  # the table lands first
    assert not fut.done()
    assert entry.table[64] == 0 and entry.hidden == {64: data[0]}  # lookups do not see it yet
    buf = bytearray(b"\xff" * 4096)
    assert drv.submit_read(64 * 4096, [buf]).result(timeout=10) == 4096
    assert bytes(buf) == bytes(4096)  # the old contents: zeros
    data[2].set_result(4096)
    assert fut.result() == 4096
    assert entry.table[64] == data[0] and entry.hidden == {}


def test_every_table_write_carries_the_hidden_updates(held):
    drv, entry = held
    fut_a, data_a, table_a = _alloc(drv, 64)
    fut_b, data_b, table_b = _alloc(drv, 65)
    assert table_b is None  # queued behind A's table write
    table_a[2].set_result(len(table_a[1]))  # A's table write lands; B's goes out
    offset, raw, fut = drv.f.writes[-1]
    first = (offset - entry.offset) // 8
    written = fmt_entries(raw)
    assert written[64 - first] == data_a[0]  # A's entry, still hidden, is not written back as 0
    assert written[65 - first] == data_b[0]
    fut.set_result(len(raw))
    data_b[2].set_result(4096)
    assert fut_b.result() == 4096 and entry.table[65] == data_b[0]
    assert entry.table[64] == 0  # A's data is still in flight
    data_a[2].set_result(4096)
    assert fut_a.result() == 4096 and entry.table[64] == data_a[0]


def test_failed_data_write_fails_the_request_but_keeps_the_written_table(held):
    drv, entry = held
    fut, data, table = _alloc(drv, 64)
    data[2].set_exception(OSError(5, "EIO"))
    table[2].set_result(len(table[1]))
    assert isinstance(fut.exception(), OSError)
    assert entry.table[64] == data[0]  # the file's table points there: so does the cache
    assert drv.state.damaged  # need-check stays set until a repair


def test_failed_table_write_before_the_data_forgets_the_hidden_update(held):
    drv, entry = held
    fut, data, table = _alloc(drv, 64)
    table[2].set_exception(OSError(5, "EIO"))
    data[2].set_result(4096)
    assert isinstance(fut.exception(), OSError)
    assert entry.table[64] == 0 and entry.hidden == {}
    assert drv.state.damaged and drv.state.unwritten == {}


def test_written_data_is_acknowledged_before_its_table_write(held):
    """Write-back: the data lands, the table write is still out. The request completes, the
    cluster is visible and no longer pending, but the allocation stays counted, and a flush waits
    for the table write before it flushes the file."""
    drv, entry = held
    fut, data, table = _alloc(drv, 64)
    data[2].set_result(4096)
    assert fut.result() == 4096
    assert entry.table[64] == data[0] and entry.hidden == {} and 64 not in drv.state.pending
    assert drv.state.allocs_in_flight == 1 and len(drv.state.unwritten) == 1
    drv.submit_write(64 * 4096, [memoryview(bytearray(b"\x08" * 4096))])  # now in place
    assert drv.f.writes[-1][0] == data[0]
    flush = drv.submit_flush()
    assert drv.f.flushes == [] and not flush.done()  # the table write comes first
    table[2].set_result(len(table[1]))
    assert len(drv.f.flushes) == 1 and not flush.done()
    drv.f.flushes[0].set_result(None)
    assert flush.result() is None
    assert drv.state.allocs_in_flight == 0 and drv.state.unwritten == {} and not drv.state.damaged


def test_failed_table_write_after_the_acknowledgement_fails_every_later_flush(held):
    drv, entry = held
    fut, data, table = _alloc(drv, 64)
    data[2].set_result(4096)
    assert fut.result() == 4096
    flush = drv.submit_flush()
    table[2].set_exception(OSError(5, "EIO"))
    assert isinstance(flush.exception(), OSError) and flush.exception().errno == 5
    assert drv.f.flushes == []  # nothing was flushed
    assert entry.table[64] == data[0]  # the cache keeps what the guest was told
    assert drv.state.damaged and drv.state.allocs_in_flight == 0 and drv.state.unwritten == {}
    again = drv.submit_flush()
    assert isinstance(again.exception(), OSError) and again.exception().errno == 5
    drv.state.meta_error = None  # (close would raise it: tested on its own below)


def fmt_entries(raw):
    from vblock.drivers.qed import tables

    return tables.decode(raw)


def test_a_lost_table_write_is_reported_by_close_and_by_unsafe_flushes(scratch):
    """cache="unsafe" flushes nothing, but a table write that failed after its request was
    acknowledged still fails the flush, and close() raises it: a conversion (which closes without
    flushing) must not report success for an image that lacks a mapping."""
    create(scratch / "u.qed", 8 * MiB, cluster_size=4096, table_size=2).close()
    img = vblock.open_image(str(scratch / "u.qed"), format="qed", cache="unsafe")
    drv = img.driver
    img.write(0, b"\x01" * 4096)  # table 0 exists and is cached, need-check is set
    real = drv.f
    drv.f = _HeldFile(real, drv.state.meta_align)
    fut, data, table = _alloc(drv, 64)
    data[2].set_result(4096)
    assert fut.result() == 4096
    flush = drv.submit_flush()
    assert not flush.done()  # waits for the table write even though nothing will be flushed
    table[2].set_exception(OSError(5, "EIO"))
    assert flush.exception().errno == 5 and drv.f.flushes == []
    drv.f = real
    with pytest.raises(OSError) as exc:
        img.close()
    assert exc.value.errno == 5


def test_an_allocation_in_a_new_table_waits_for_its_l1_entry(held):
    """A new table is found by lookups only through its L1 entry: a request allocating in it is
    not acknowledged when its data lands (write-back applies to existing tables only), but once the
    table, its flush and the L1 entry are written."""
    drv, _ = held
    cluster = drv.geo.table_entries  # the first cluster of the second table, not yet created
    before = len(drv.f.writes)
    fut = drv.submit_write(cluster * 4096, [memoryview(bytearray(b"\x09" * 4096))])
    data, table = drv.f.writes[before:]
    assert len(data[1]) == 4096 and len(table[1]) == drv.geo.table_bytes  # the whole new table
    data[2].set_result(4096)
    assert not fut.done() and drv.l1[1] == 0 and drv.state.unwritten == {}
    table[2].set_result(len(table[1]))
    assert not fut.done() and len(drv.f.flushes) == 1  # the table is flushed before L1 points at it
    drv.f.flushes[0].set_result(None)
    l1_write = drv.f.writes[-1]
    assert l1_write[0] == drv.state.header.l1_table_offset and not fut.done()
    l1_write[2].set_result(len(l1_write[1]))
    assert fut.result() == 4096 and drv.l1[1] == table[0]
    assert drv._learn_host(cluster) == data[0]  # lookups find it at its data cluster

"""``python -m vblock.bench block`` runs and emits the shared row format (speed is not asserted)."""

import dataclasses
import io
import json

from vblock.bench import block, report


def test_block_bench_rows_have_the_host_bench_keys():
    rows = block.run(
        duration=0.1,
        depths=(2,),
        engines=("threads",),
        cases=(("randwrite", 8192),),
        size=8 << 20,
        rounds=2,
    )
    assert len(rows) == 1
    out = io.StringIO()
    report(rows, as_json=True, out=out)
    row = json.loads(out.getvalue())
    assert list(row) == [
        "layer",
        "engine",
        "pattern",
        "block_size",
        "depth",
        "iops",
        "mbps",
        "peer",
        "peer_iops",
        "ratio",
    ]
    assert row["layer"] == "block" and row["engine"] == "threads" and row["depth"] == 2
    assert row["peer"] == "hostfile threads"
    assert row["iops"] > 0 and row["peer_iops"] > 0
    assert row["ratio"] == row["iops"] / row["peer_iops"]
    assert dataclasses.is_dataclass(rows[0])


def test_block_bench_main_parses_its_options(capsys, monkeypatch):
    seen = {}

    def fake_run(**kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(block, "run", fake_run)
    assert (
        block.main(
            ["--depth", "4", "--engine", "io_uring", "--pattern", "randread", "--duration", "1"]
        )
        == 0
    )
    assert seen["depths"] == (4,) and seen["engines"] == ("io_uring",)
    assert seen["cases"] == (("randread", 4096),) and seen["duration"] == 1.0


def test_settle_file_leaves_the_file_on_disk_and_out_of_the_page_cache(scratch):
    """A benchmark's image starts clean and uncached: a read that may not wait for the disk
    (RWF_NOWAIT) finds the page before settle_file and not after."""
    import errno
    import os

    from vblock.bench import settle_file

    path = scratch / "s.img"
    path.write_bytes(b"\x5a" * (1 << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT) == 4096  # cached (and dirty)
        settle_file(str(path))
        try:
            os.preadv(fd, [bytearray(4096)], 0, os.RWF_NOWAIT)
            cached = True
        except BlockingIOError as exc:
            assert exc.errno == errno.EAGAIN
            cached = False
        assert not cached
    finally:
        os.close(fd)
    assert path.read_bytes() == b"\x5a" * (1 << 20)

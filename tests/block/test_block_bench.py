"""``python -m vblock.bench block`` runs and emits the shared row format (speed is not asserted)."""

import dataclasses
import io
import json

from vblock.bench import block, report


def test_block_bench_rows_have_the_host_bench_keys():
    rows = block.run(
        duration=0.1, depths=(2,), engines=("threads",), cases=(("randwrite", 8192),), size=8 << 20, rounds=2
    )
    assert len(rows) == 1
    out = io.StringIO()
    report(rows, as_json=True, out=out)
    row = json.loads(out.getvalue())
    assert list(row) == [
        "layer", "engine", "pattern", "block_size", "depth", "iops", "mbps", "peer", "peer_iops", "ratio",
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
    assert block.main(["--depth", "4", "--engine", "io_uring", "--pattern", "randread", "--duration", "1"]) == 0
    assert seen["depths"] == (4,) and seen["engines"] == ("io_uring",)
    assert seen["cases"] == (("randread", 4096),) and seen["duration"] == 1.0

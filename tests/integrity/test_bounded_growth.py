"""A hostile guest allocates, the host loses power, the image is reopened: hundreds of times. The
image file never holds more than its metadata, its referenced clusters and one allocation batch."""

import os
import random

import pytest

import vblock
from tests.integrity.qed_layout import referenced_bytes
from vblock.testing import faults

CYCLES = 200
CS = 65536
SIZE = 256 << 20


@pytest.mark.parametrize("backing", [False, True], ids=["standalone", "with-backing"])
def test_crash_loop_growth_is_bounded(scratch, backing):
    path = str(scratch / "img.qed")
    opts = {"cluster_size": CS}
    if backing:
        base = str(scratch / "base.raw")
        with open(base, "wb") as f:
            f.truncate(SIZE // 2)
        opts.update(backing_file=base, backing_fmt="raw")
    vblock.create_image(path, "qed", SIZE, **opts).close()
    rng = random.Random(11)
    batch = 16  # requests in flight per round: one allocation batch is at most 16 clusters + tables
    worst = 0
    for cycle in range(CYCLES):
        plan = faults.FaultPlan(crash_after=rng.randint(0, 3 * batch), only=["img.qed"])
        with faults.install(plan):
            img = vblock.open_image(path, format="qed", need_check_timeout=0)
            futs = [
                img.submit_write(
                    rng.randrange(SIZE // 4096) * 4096, [bytes([cycle % 251 + 1]) * 4096]
                )
                for _ in range(batch)
            ]
            for fu in futs:
                try:
                    fu.result(timeout=60)
                except OSError:
                    pass
            for f in plan.files:
                if f.path == path:
                    f.settle_crash(rng)
            img.lock.close()  # the "crashed" image is abandoned; a dead process's locks go with it
        with vblock.open_image(path, format="qed") as img:  # automatic repair
            res = img.check()
        assert res["corruptions"] == 0, (cycle, res)
        extra = os.path.getsize(path) - referenced_bytes(path)
        worst = max(worst, extra)
        assert extra <= 0, (cycle, extra, res)
    assert worst <= 0

"""EIO / ENOSPC on each named write of the QED allocation order: the request fails with that errno
(or, for a table update that fails after its request was acknowledged, the next flush does), a
virtio-blk device answers IOERR, and after reopening the image checks clean with every flushed
write intact."""

import errno

import pytest

import vblock
from tests.integrity.crashlib import identify, pattern
from vblock.testing import faults
from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
from vblock.virtio import spec as S
from vblock.virtio.driver import Driver

CS = 4096
POINTS = ["DATA_WRITE", "L2_ALLOC", "L2_UPDATE", "L1_UPDATE", "HEADER_UPDATE"]


def _data(wid, offset, length):
    return b"".join(pattern(wid, offset // 512 + i) for i in range(length // 512))


def _new_image(path, backing=None):
    opts = {"cluster_size": CS, "table_size": 2}
    if backing:
        opts.update(backing_file=backing, backing_fmt="raw")
    vblock.create_image(path, "qed", 16 << 20, **opts).close()


def _close(img, failed):
    """Close ``img``; after a failed flush (a lost table write) close raises the same error."""
    if failed:
        with pytest.raises(OSError):
            img.close()
    else:
        img.close()


def _verify(path, acked):
    with vblock.open_image(path, format="qed") as img:  # read-write: repairs if need-check is set
        res = img.check()
        assert (res["corruptions"], res["leaks"], res["check-errors"]) == (0, 0, 0), res
        for wid, offset, length in acked:
            got = img.read(offset, length)
            for i in range(length // 512):
                assert identify(got[i * 512 : (i + 1) * 512], offset // 512 + i) == wid


@pytest.mark.parametrize("err", [errno.EIO, errno.ENOSPC])
@pytest.mark.parametrize("point", POINTS)
def test_failed_metadata_or_data_write(scratch, point, err):
    path = str(scratch / "img.qed")
    _new_image(path)
    acked = []
    with vblock.open_image(path, format="qed", need_check_timeout=0) as img:
        img.write(0, _data(1, 0, 8192))
        img.flush()
        acked.append((1, 0, 8192))
    plan = faults.FaultPlan(fail_points={point: err}, only=["img.qed"])
    with faults.install(plan):
        img = vblock.open_image(path, format="qed", need_check_timeout=0)
        outcomes = []
        written = []
        # New L2 table (second L2 region), then more allocations in an existing table.
        for wid, offset in ((2, 8 << 20), (3, 64 * 1024), (4, (8 << 20) + CS)):
            try:
                img.write(offset, _data(wid, offset, 4096))
            except OSError as exc:
                outcomes.append(("write", exc.errno))
            else:
                written.append((wid, offset, 4096))
        try:
            img.flush()
        except OSError as exc:
            outcomes.append(("flush", exc.errno))
        else:
            acked += written  # flushed: must survive
        _close(img, failed=bool(outcomes) and outcomes[-1][0] == "flush")
    assert plan.injected, f"no write was issued at {point}"
    if point == "L2_UPDATE":
        # Write-back: an update of an existing table may fail after its request was acknowledged
        # (its data landed first); then the flush reports it, and nothing since is promised.
        assert outcomes in ([("write", err)], [("flush", err)])
    else:
        assert outcomes == [("write", err)]  # exactly the request that met the fault failed
    _verify(path, acked)


def test_device_reports_ioerr_and_keeps_serving(scratch):
    path = str(scratch / "img.qed")
    _new_image(path)
    plan = faults.FaultPlan(fail_points={"L2_UPDATE": errno.EIO}, only=["img.qed"])
    with faults.install(plan):
        img = vblock.open_image(path, format="qed", need_check_timeout=0)
        mem = GuestMemory.anonymous(4 << 20)
        dev = VirtioBlk(img, mem)
        drv = Driver(VirtioMmio(dev), mem)
        drv.start()
        assert drv.write(0, _data(1, 0, 4096)) == S.VIRTIO_BLK_S_OK  # new L2 table
        second = drv.write(16, _data(2, 8192, 4096))  # its L2 update fails
        assert drv.write(32, _data(3, 16384, 4096)) == S.VIRTIO_BLK_S_OK
        # IOERR for the request, or (acknowledged once its data landed: write-back) for the flush
        flushed = drv.flush()
        assert (second, flushed) in (
            (S.VIRTIO_BLK_S_IOERR, S.VIRTIO_BLK_S_OK),
            (S.VIRTIO_BLK_S_OK, S.VIRTIO_BLK_S_IOERR),
        )
        status, data = drv.read(32, 4096)
        assert status == S.VIRTIO_BLK_S_OK and bytes(data) == _data(3, 16384, 4096)
        _close(img, failed=flushed != S.VIRTIO_BLK_S_OK)
    _verify(path, [(1, 0, 4096), (3, 16384, 4096)])

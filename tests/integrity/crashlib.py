"""Crash-consistency harness: scripted workloads, a model of what each sector may hold, and the
recovery checks of issue 7 (a)-(e).

A workload is a list of steps run through ``vblock.open_image`` on a QED image:
``("write", offset, length)``, ``("zeroes", offset, length)``, ``("discard", offset, length)``,
``("flush",)``, ``("resize", size)`` and ``("group", [steps...])`` (steps submitted together, all in
flight at once). Every write fills each 512-byte sector with a pattern naming (write id, sector),
so a sector read back tells which write it came from.
"""

from __future__ import annotations

import os
import random
import struct

import vblock
from tests.integrity.qed_layout import referenced_bytes
from vblock.testing import faults

SECTOR = 512
ZERO_ID = 0
BACKING_ID = -1
_TAG = struct.Struct("<qq")


def pattern(wid, sector):
    """512 bytes that identify write ``wid`` at absolute ``sector``."""
    head = _TAG.pack(wid, sector)
    return head * (SECTOR // len(head))


def backing_pattern(sector):
    return pattern(BACKING_ID, sector)


def identify(data, sector):
    """Which write id produced these 512 bytes at ``sector`` (ZERO_ID for zeros), or None."""
    if data == bytes(SECTOR):
        return ZERO_ID
    wid, s = _TAG.unpack_from(data)
    if s == sector and data == pattern(wid, sector):
        return wid
    return None


class Model:
    """For each sector: ``stable`` (what it may durably hold after the last completed flush),
    ``volatile`` (contents written since then, acknowledged or not), ``last`` (what it holds now
    if nothing crashes: one element unless concurrent writes overlapped)."""

    def __init__(self, nsectors, initial):
        self.stable = [{initial(s)} for s in range(nsectors)]
        self.volatile = [set() for _ in range(nsectors)]
        self.last = [{initial(s)} for s in range(nsectors)]

    def grow(self, nsectors):
        for _ in range(len(self.stable), nsectors):
            self.stable.append({ZERO_ID})
            self.volatile.append(set())
            self.last.append({ZERO_ID})

    def wrote(self, sectors, wid, group=None):
        for s in sectors:
            self.volatile[s].add(wid)
            if group is not None and s in group:
                self.last[s].add(wid)
            else:
                self.last[s] = {wid}
            if group is not None:
                group.add(s)

    def discarded(self, sectors):
        for s in sectors:
            self.volatile[s].add(ZERO_ID)
            self.last[s] = self.last[s] | {ZERO_ID}

    def flushed(self):
        for s in range(len(self.stable)):
            self.stable[s] = set(self.last[s])
            self.volatile[s].clear()

    def allowed_after_crash(self, s):
        return self.stable[s] | self.volatile[s]


def make_image(directory, size, backing=False, cluster_size=4096, table_size=1):
    path = os.path.join(directory, "img.qed")
    opts = {"cluster_size": cluster_size, "table_size": table_size}
    initial = lambda s: ZERO_ID  # noqa: E731
    if backing:
        bpath = os.path.join(directory, "base.raw")
        bsize = size // 2 + 3 * SECTOR  # smaller than the image, ending mid-cluster
        with open(bpath, "wb") as f:
            for s in range(bsize // SECTOR):
                f.write(backing_pattern(s))
        opts.update(backing_file=bpath, backing_fmt="raw")
        nback = bsize // SECTOR
        initial = lambda s: BACKING_ID if s < nback else ZERO_ID  # noqa: E731
    img = vblock.create_image(path, "qed", size, **opts)
    img.close()
    return path, initial


def run_workload(path, steps, model):
    """Run ``steps`` on the image at ``path``; stop at the first failure (the crash). Returns the
    open image (not closed: a crashed process never closes) and whether it ran to the end."""
    img = vblock.open_image(path, format="qed", cache="none", need_check_timeout=0)
    wid = [1000]

    def issue(step, group):
        kind = step[0]
        if kind == "write":
            _, off, length = step
            wid[0] += 1
            first = off // SECTOR
            data = b"".join(pattern(wid[0], first + i) for i in range(length // SECTOR))
            model.wrote(range(first, first + length // SECTOR), wid[0], group)
            return img.submit_write(off, [data])
        if kind == "zeroes":
            _, off, length = step
            model.wrote(range(off // SECTOR, (off + length) // SECTOR), ZERO_ID, group)
            return img.submit_write_zeroes(off, length)
        if kind == "discard":
            _, off, length = step
            model.discarded(range(off // SECTOR, (off + length) // SECTOR))
            return img.submit_discard(off, length)
        if kind == "flush":
            return img.submit_flush()
        raise AssertionError(step)

    try:
        for step in steps:
            if step[0] == "group":
                group = set()
                futs = [issue(s, group) for s in step[1]]
                for fu in futs:
                    fu.result(timeout=60)
            elif step[0] == "resize":
                img.resize(step[1])
                model.grow(step[1] // SECTOR)
            else:
                issue(step, None).result(timeout=60)
                if step[0] == "flush":
                    model.flushed()
    except OSError:
        return img, False
    return img, True


def count_write_points(directory, steps, size, backing=False):
    """How many write-type host operations the workload makes (the crash points)."""
    path, initial = make_image(directory, size, backing)
    plan = faults.FaultPlan(only=[os.path.basename(path)])
    model = Model(size // SECTOR, initial)
    with faults.install(plan):
        img, finished = run_workload(path, steps, model)
        img.close()
    assert finished
    return plan.writes


def crash_and_recover(directory, steps, size, crash_after, seed, backing=False):
    """Crash the workload after ``crash_after`` write points, settle the disk, reopen (automatic
    repair) and check everything. Returns a dict of findings (empty lists when all is well)."""
    path, initial = make_image(directory, size, backing)
    nsectors = size // SECTOR
    model = Model(nsectors, initial)
    plan = faults.FaultPlan(crash_after=crash_after, only=[os.path.basename(path)])
    with faults.install(plan):
        img, finished = run_workload(path, steps, model)
        rng = random.Random(seed)
        for f in plan.files:
            if f.path == path:
                f.settle_crash(rng)
    # The crashed image object is abandoned, as a killed process would leave it; its image locks
    # go as a killed process's would.
    img.lock.close()
    findings = {"bad_sectors": [], "corruptions": 0, "leaks": 0, "oversize": 0}
    with vblock.open_image(path, format="qed", cache="none") as img2:  # repairs: need-check
        result = img2.check()
        findings["corruptions"] = result.get("corruptions", 0)
        findings["leaks"] = result.get("leaks", 0)
        vsize = img2.size
        data = img2.read(0, vsize)
    for s in range(min(vsize, len(model.stable) * SECTOR) // SECTOR):
        got = identify(data[s * SECTOR : (s + 1) * SECTOR], s)
        if got not in model.allowed_after_crash(s):
            findings["bad_sectors"].append((s, got, sorted(model.allowed_after_crash(s))))
    used = referenced_bytes(path)
    findings["oversize"] = max(0, os.path.getsize(path) - used)
    return findings

"""Many threads on one image: allocations racing in shared clusters, in-place writes, reads."""

import os
import random
import struct
import threading

import pytest

from tests.qed.qed_helpers import MiB, create, reopen

SECTOR = 512
THREADS = 16


def _sector(owner, seq):
    """A 512-byte sector that names its writer; never all zeros."""
    return struct.pack("<II", owner + 1, seq + 1) * (SECTOR // 8)


def _decode(data):
    owner, seq = struct.unpack_from("<II", data)
    if data != struct.pack("<II", owner, seq) * (SECTOR // 8):
        return "torn"
    return None if owner == 0 else (owner - 1, seq - 1)


@pytest.mark.parametrize("cache_size,backing", [(2, False), (64, False), (1, True)])
def test_sixteen_threads(scratch, cache_size, backing):
    size = 16 * MiB  # 8 L2 regions of 2 MiB with 4 KiB clusters and table_size 1
    opts = dict(cluster_size=4096, table_size=1)
    if backing:
        with open(scratch / "base.raw", "wb") as f:
            f.write(bytes(size))  # zeros: the model stays "zeros or a tag"
        opts.update(backing_file="base.raw", backing_fmt="raw")
    p = scratch / "c.qed"
    create(p, size, **opts).close()
    img = reopen(p, l2_cache_size=cache_size)
    nsectors = size // SECTOR
    last = {}  # sector -> seq of its owner's last completed write
    errors = []
    barrier = threading.Barrier(THREADS + 3)

    half = (2 << 20) // 2  # writers use the first half of each 2 MiB L2 region
    zone = [s for s in range(nsectors) if (s * SECTOR) % (2 << 20) < half]
    owner_of = {s: i % THREADS for i, s in enumerate(zone)}

    def writer(owner):
        rnd = random.Random(owner)
        mine = zone[owner::THREADS]  # every thread writes into every cluster of the zone
        try:
            barrier.wait()
            for seq in range(250):
                # a cluster-local hot spot half of the time, anywhere otherwise
                if rnd.random() < 0.5:
                    s = mine[rnd.randrange(0, 64)]
                else:
                    s = rnd.choice(mine)
                img.write(s * SECTOR, _sector(owner, seq))
                last[s] = seq
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def reader(seed):
        rnd = random.Random(1000 + seed)
        try:
            barrier.wait()
            for _ in range(400):
                s = rnd.randrange(0, nsectors - 8)
                data = img.read(s * SECTOR, 8 * SECTOR)
                for i in range(8):
                    if ((s + i) * SECTOR) % (2 << 20) >= half:
                        continue  # the zeroer's half: checked at the end
                    got = _decode(data[i * SECTOR : (i + 1) * SECTOR])
                    if got == "torn" or (got is not None and got[0] != owner_of[s + i]):
                        errors.append(AssertionError(f"sector {s + i}: {got}"))
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    # One more thread zeroes, discards and rewrites whole clusters in the second halves, so that
    # zero markers and hole punches land in the same tables as the writers' allocations.
    model = bytearray(size)
    allocated = set()

    def zeroer():
        rnd = random.Random(99)
        try:
            barrier.wait()
            for seq in range(150):
                region = rnd.randrange(size // (2 << 20))
                c = (region * (2 << 20) + half) // 4096 + rnd.randrange(half // 4096 - 2)
                off, n = c * 4096, 4096 * rnd.randint(1, 2)
                op = rnd.random()
                if op < 0.4:
                    data = bytes([seq % 250 + 1]) * n
                    img.write(off, data)
                    model[off : off + n] = data
                    allocated.update(range(c, c + n // 4096))
                elif op < 0.7:
                    img.write_zeroes(off, n)
                    model[off : off + n] = bytes(n)
                else:
                    img.discard(off, n)
                    for k in range(c, c + n // 4096):
                        if k in allocated:
                            model[k * 4096 : (k + 1) * 4096] = bytes(4096)
        except Exception as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
    threads += [threading.Thread(target=reader, args=(i,)) for i in range(2)]
    threads.append(threading.Thread(target=zeroer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(img.driver.cache) <= max(cache_size, 1) + THREADS  # bounded, transient overshoot

    def verify(image):
        data = image.read(0, size)
        for s in range(nsectors):
            if (s * SECTOR) % (2 << 20) >= half:
                assert data[s * SECTOR : (s + 1) * SECTOR] == model[s * SECTOR : (s + 1) * SECTOR]
                continue
            got = _decode(data[s * SECTOR : (s + 1) * SECTOR])
            want = None if s not in last else (owner_of[s], last[s])
            assert got == want, f"sector {s}"

    verify(img)
    r = img.check()
    assert (r["corruptions"], r["leaks"], r["check-errors"]) == (0, 0, 0)
    img.close()
    img = reopen(p, read_only=True)
    verify(img)
    img.close()


def test_concurrent_misses_load_a_table_once(scratch):
    p = scratch / "m.qed"
    img = create(p, 16 * MiB, cluster_size=4096, table_size=1)
    img.write(0, b"\x01" * 4096)
    img.close()
    img = reopen(p, read_only=True)
    loads = []
    img.driver.events = lambda name: loads.append(name) if name == "L2_LOAD" else None
    barrier = threading.Barrier(16)
    out = []

    def go():
        barrier.wait()
        out.append(img.read(0, 4096))

    ts = [threading.Thread(target=go) for _ in range(16)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert out == [b"\x01" * 4096] * 16
    assert loads == ["L2_LOAD"]
    img.close()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_pool_threads_started_from_a_pinned_thread_run_on_every_cpu(scratch):
    """The driver's pool starts threads on demand, often from a completion callback on a
    thread-engine worker that keeps to one CPU just then: they must not inherit that CPU."""
    p = scratch / "pin.qed"
    create(p, 4 * MiB).close()
    img = reopen(p, pool_size=4)
    full = os.sched_getaffinity(0)
    barrier = threading.Barrier(4)

    def where():
        barrier.wait(timeout=30)  # four tasks at once: four threads, all started below
        return os.sched_getaffinity(0)

    futs = []

    def pinned_submitter():  # as a thread-engine worker kept to one CPU
        os.sched_setaffinity(0, {min(full)})
        futs.extend(img.driver.pool.submit(where) for _ in range(4))

    t = threading.Thread(target=pinned_submitter)
    t.start()
    t.join()
    assert [f.result(timeout=30) for f in futs] == [full] * 4
    img.close()

"""16 threads write overlapping, unaligned ranges while reading: no sector is ever torn.

Every write fills its range with its own tag byte (1..N). A sector's bytes are consistent when
the writes that show in it can be put in one order in which each came wholly after the others
that cover the same bytes: a byte showing tag W means every other write X covering that byte and
visible in the sector came before W. Read-modify-write that raced (a lost write) or a torn sector
shows up as a cycle in that order, or as a byte still showing the initial zero although a write
covering it is visible in the sector. The final disk must satisfy it with *every* write visible,
and the order must also respect real time: a write that completed before another was submitted
comes first (this is what exposes a write lost to a racing read-modify-write).
"""

import itertools
import random
import threading

import pytest

from tests.block.block_helpers import LaggyMemory, make_image
from vblock.block import register, registry
from vblock.block.bounce import aligned_buffer

SECTOR = 512
REGION = 64 * 1024
THREADS = 16
WRITES_PER_THREAD = 12  # 192 writes: tags fit in a byte


def _plan(seed=1234, aligned_share=0.0, region=REGION):
    """Per thread: (tag, offset, length, read_at) tuples; ``aligned_share`` of the writes are
    whole sectors (they take the zero-copy path when their buffer is aligned too)."""
    rng = random.Random(seed)
    plan = []
    tag = 1
    for _ in range(THREADS):
        mine = []
        for _ in range(WRITES_PER_THREAD):
            if rng.random() < aligned_share:
                length = rng.randint(1, 6) * SECTOR
                offset = rng.randint(0, (region - length) // SECTOR) * SECTOR
                mine.append((tag, offset, length, rng.randint(0, region - 1)))
                tag += 1
                continue
            while True:
                length = rng.randint(1, 3000)
                offset = rng.randint(0, region - length)
                if offset % SECTOR or length % SECTOR:  # unaligned on at least one side
                    break
            mine.append((tag, offset, length, rng.randint(0, region - 1)))
            tag += 1
        plan.append(mine)
    return plan


def _sector_violations(start, data, cover, visible_all, precedes=None):
    """Check one sector's bytes ``data`` (absolute offset ``start``); returns a message or None.

    ``cover[p]``: tags of the writes covering byte p. ``visible_all``: treat every covering write
    as applied (the final state) instead of only those whose tag shows in the sector.
    ``precedes(a, b)``: True when write a completed before write b was submitted."""
    shown = set(data)
    before = {}  # tag -> set of tags that must come before it
    involved = set()
    for i, tag in enumerate(data):
        p = start + i
        covering = cover[p]
        if tag and tag not in covering:
            return f"byte {p} holds tag {tag}, which never wrote there"
        applied = covering if visible_all else covering & shown
        involved |= applied
        if not tag:
            if applied:
                return f"byte {p} still zero although covering writes {sorted(applied)} are visible"
            continue
        before.setdefault(tag, set()).update(applied - {tag})
    if precedes is not None:
        for a in involved:
            for b in involved:
                if a != b and precedes(a, b):
                    before.setdefault(b, set()).add(a)
    # acyclic? (Kahn's algorithm over the visible tags)
    nodes = set(before) | {t for s in before.values() for t in s}
    indeg = {n: 0 for n in nodes}
    for w, pre in before.items():
        indeg[w] += len(pre)
    after = {}
    for w, pre in before.items():
        for x in pre:
            after.setdefault(x, []).append(w)
    ready = [n for n, d in indeg.items() if d == 0]
    seen = 0
    while ready:
        n = ready.pop()
        seen += 1
        for w in after.get(n, ()):
            indeg[w] -= 1
            if indeg[w] == 0:
                ready.append(w)
    if seen != len(nodes):
        return f"sector at {start}: the writes showing in it cannot be ordered (torn or lost write)"
    return None


def _check(offset, data, cover, visible_all=False, precedes=None):
    pos = 0
    while pos < len(data):
        p = offset + pos
        n = min(SECTOR - p % SECTOR, len(data) - pos)
        msg = _sector_violations(p, data[pos : pos + n], cover, visible_all, precedes)
        if msg:
            return msg
        pos += n
    return None


CASES = [
    ({"format": "raw", "cache": "none"}, 0.0, REGION),
    ({"format": "memory"}, 0.0, REGION),
    # plain (zero-copy) writes racing read-modify-writes on a small, crowded disk
    ({"format": "raw", "cache": "none"}, 0.9, 8 * 1024),
    # the same where writes land late and out of order, so a race would lose writes visibly
    ({"format": "laggy"}, 0.9, 8 * 1024),
]


@pytest.fixture
def laggy():
    register("laggy", LaggyMemory)
    yield
    registry.unregister("laggy")


@pytest.mark.parametrize(
    "config,aligned_share,region",
    CASES,
    ids=["raw-none", "memory", "raw-none-mixed-aligned", "laggy-mixed-aligned"],
)
def test_overlapping_unaligned_writes_never_tear_a_sector(
    scratch, laggy, config, aligned_share, region
):
    plan = _plan(aligned_share=aligned_share, region=region)
    cover = [set() for _ in range(region)]
    for mine in plan:
        for tag, offset, length, _ in mine:
            for p in range(offset, offset + length):
                cover[p].add(tag)

    img = make_image(scratch, "conc.raw", region, config)
    if config["format"] == "raw":
        assert img.limits.request_alignment == SECTOR or img.limits.request_alignment % SECTOR == 0
    clock = itertools.count()  # next() is atomic: a global order of submit and completion events
    submitted = {}
    completed = {}
    snapshots = []
    errors = []
    start = threading.Barrier(THREADS)

    def worker(mine):
        try:
            start.wait()
            pending = []
            for tag, offset, length, read_at in mine:
                if offset % SECTOR or length % SECTOR:
                    data = bytes([tag]) * length
                else:  # whole sectors from page-aligned memory: the zero-copy path
                    data = aligned_buffer(length)
                    data[:] = bytes([tag]) * length
                submitted[tag] = next(clock)
                fut = img.submit_write(offset, [data])
                fut.add_done_callback(lambda f, tag=tag: completed.__setitem__(tag, next(clock)))
                pending.append(fut)
                if len(pending) == 3:  # keep a few writes of each thread in flight
                    pending.pop(0).result(timeout=60)
                n = min(1500, region - read_at)
                snapshots.append((read_at, img.read(read_at, n)))
            for f in pending:
                f.result(timeout=60)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in plan]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert errors == []

    final = img.read(0, region)
    img.close()
    assert len(completed) == THREADS * WRITES_PER_THREAD

    def precedes(a, b):
        return completed[a] < submitted[b]

    assert _check(0, final, cover, visible_all=True, precedes=precedes) is None
    bad = [msg for off, data in snapshots if (msg := _check(off, data, cover))]
    assert bad == []
    assert len(snapshots) == THREADS * WRITES_PER_THREAD


def test_checker_catches_a_lost_write():
    """The checker itself: a read-modify-write that put old bytes back is reported."""
    cover = [set() for _ in range(1024)]
    for p in range(0, 300):
        cover[p].add(1)  # write 1 covers [0, 300)
    for p in range(100, 200):
        cover[p].add(2)  # write 2 covers [100, 200)
    good = bytes([1] * 100 + [2] * 100 + [1] * 100) + bytes(212)
    assert _check(0, good, cover, visible_all=True) is None
    # write 2 applied first at 100..150 only, then write 1 over all: 2 shows at 150..200 -> torn
    torn = bytes([1] * 150 + [2] * 50 + [1] * 100) + bytes(212)
    assert _check(0, torn, cover, visible_all=True) is not None
    # write 1 lost in part: zero where it should be
    lost = bytes([0] * 100 + [2] * 100 + [1] * 100) + bytes(212)
    assert _check(0, lost, cover, visible_all=True) is not None
    # write 1 completed before write 2 was submitted, yet 1 shows over 2: write 2 was lost
    late = bytes([1] * 300) + bytes(212)
    assert _check(0, late, cover, visible_all=True) is None
    assert (
        _check(0, late, cover, visible_all=True, precedes=lambda a, b: (a, b) == (1, 2)) is not None
    )

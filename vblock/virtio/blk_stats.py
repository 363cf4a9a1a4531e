"""Request statistics of a virtio-blk device: per queue and request type, counts, bytes, errors
and a latency histogram, and the report ``VirtioBlk.stats()`` returns.

Every published request is counted by type: one clock read per queue turn (when the device picks
requests up) and one per published batch, and a few additions per request under the lock that
publishes it, so counts are exact. Latency runs from the turn that picked a request up to the
batch that published it, so it includes, in poll mode, the wait for ``poll()``. Counts live for
the device's life and survive resets.

Contract. A queue's counters are made once per device queue (:func:`new_counters`) and kept
across resets (a reset gives the queue fresh ring state but the same counters). They are written
only by the request path, inline in ``blk_datapath.BlkDataPath._flush`` (no call per request)
and only under the queue's used-side lock; :func:`report` reads them from any thread without
that lock, so a request being published meanwhile may or may not be in a report.

Units: ``bytes`` in bytes, latencies counted in nanoseconds (``time.perf_counter_ns``) and
reported in microseconds. The histogram is log-linear, four buckets per power of two: a latency
``lat`` (at least 8 ns) with ``b = lat.bit_length()`` goes into bucket ``b << 2 | (lat >> (b -
3)) & 3`` (the publisher computes that inline); a bucket's top is ``(5 + q) << (b - 3)`` for
``q = index & 3``, so a percentile is exact to within a quarter of an octave.
"""

from __future__ import annotations

from typing import Any

from vblock.virtio.spec import (
    VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH,
    VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
)

__all__ = ["KINDS", "STATS_KEYS", "Counter", "new_counters", "report"]

# stats() keys, by request type; anything else counts as "unsupported".
KINDS = {
    VIRTIO_BLK_T_IN: "read",
    VIRTIO_BLK_T_OUT: "write",
    VIRTIO_BLK_T_FLUSH: "flush",
    VIRTIO_BLK_T_DISCARD: "discard",
    VIRTIO_BLK_T_WRITE_ZEROES: "write_zeroes",
    VIRTIO_BLK_T_GET_ID: "get_id",
}
STATS_KEYS = (*KINDS.values(), "unsupported")


class Counter:
    """One request type's counts on one queue. Latencies go into a log-linear histogram: four
    buckets per power of two of nanoseconds, so a percentile is exact to within a quarter of an
    octave; ``max_ns`` is exact. Updated only under the queue's used-side lock."""

    __slots__ = ("ops", "bytes", "errors", "max_ns", "hist")

    def __init__(self):
        self.ops = self.bytes = self.errors = self.max_ns = 0
        self.hist = [0] * 256

    def add(self, other):
        self.ops += other.ops
        self.bytes += other.bytes
        self.errors += other.errors
        self.max_ns = max(self.max_ns, other.max_ns)
        self.hist = [a + b for a, b in zip(self.hist, other.hist)]

    def _percentile_us(self, fraction):
        rank = -(-self.ops * fraction // 1) or 1
        seen = 0
        for idx, n in enumerate(self.hist):
            seen += n
            if n and seen >= rank:
                b, q = idx >> 2, idx & 3
                return round(min((5 + q) << (b - 3), self.max_ns) / 1000, 1)  # bucket's top
        return 0.0

    def as_dict(self):
        return {
            "ops": self.ops,
            "bytes": self.bytes,
            "errors": self.errors,
            "p50": self._percentile_us(0.5),
            "p99": self._percentile_us(0.99),
            "max": round(self.max_ns / 1000, 1),
        }


def new_counters():
    """A queue's counters: request type code -> Counter, and the one for everything else."""
    return {t: Counter() for t in KINDS}, Counter()


def report(queue_counters) -> dict[str, Any]:
    """``VirtioBlk.stats()``'s dict (documented there) from each queue's ``new_counters()``
    pair: the totals by request type, and ``queues``, the same per queue."""
    per_queue = []
    total = {kind: Counter() for kind in STATS_KEYS}
    for counters, other in queue_counters:
        entry = {}
        for kind, c in [*((KINDS[t], c) for t, c in counters.items()), ("unsupported", other)]:
            snap = Counter()
            snap.add(c)
            total[kind].add(snap)
            entry[kind] = snap.as_dict()
        per_queue.append(entry)
    out: dict[str, Any] = {kind: c.as_dict() for kind, c in total.items()}
    out["queues"] = per_queue
    return out

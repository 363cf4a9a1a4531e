"""Alignment for drivers that need it: buffer addresses, bounce buffers, and the range lock.

Theory of operation
-------------------
A driver declares ``Limits.request_alignment`` (A, bytes) and ``Limits.mem_alignment`` (M, bytes).
An O_DIRECT raw file has A = M = 512 or 4096; memory and null drivers have A = M = 1 and never
come here. ``vblock.block.image`` sends a request straight down when its offset and every buffer
length are multiples of A and every buffer address is a multiple of M. Otherwise it *bounces*:

* reads: read the covering aligned span ``[a0, a1)`` into a pooled aligned buffer, copy out;
* aligned writes from unaligned memory: copy into a pooled buffer, write it;
* unaligned writes: read-modify-write (RMW): read the partial head and tail blocks into the pooled
  buffer, copy the caller's bytes over the middle, write the whole span.

An RMW writes back bytes it did not mean to change, so it must not race another write to the same
blocks: if a plain write to block B landed between the RMW's read and its write, the RMW would put
the old bytes back and the plain write would be lost. ``RangeLock`` prevents that, as QEMU's
serialising requests do. Every write-type request on such an image holds an entry over the aligned
blocks it touches while it is in flight: RMWs hold *exclusive* entries, everything else *shared*
ones. Shared entries never wait for each other; an exclusive entry waits for every overlapping
entry, and every overlapping entry waits for it. Waiting never blocks a thread: a request that
cannot start yet is queued with a callback, and whoever releases the conflicting entry starts it.
Queued entries keep their order: a newcomer also waits for queued entries it conflicts with, so an
RMW cannot be starved by a stream of plain writes. Bounced reads take shared entries too, so a read
never sees an RMW's block half written.

The plain aligned write path costs one uncontended lock and a list append: its entry is a *slot*
that needs no completion callback (finished slots are swept out lazily) unless an RMW has to
wait for it (see ``RangeLock``). Aligned reads into aligned memory take no entry at all.
"""

from __future__ import annotations

import functools
import itertools
import mmap
import threading

from vblock.hostio import buffer_address as address_of

PAGE_SIZE = mmap.PAGESIZE


def aligned_buffer(length: int, alignment: int = PAGE_SIZE) -> memoryview:
    """A zeroed, writable ``memoryview`` of ``length`` bytes whose address is a multiple of
    ``alignment``. Anonymous mmap memory is page aligned; larger alignments over-allocate."""
    if alignment <= PAGE_SIZE:
        return memoryview(mmap.mmap(-1, max(length, 1)))[:length]
    raw = memoryview(mmap.mmap(-1, length + alignment))
    skip = -address_of(raw) % alignment
    return raw[skip : skip + length]


class BufferPool:
    """Aligned bounce buffers, recycled by size class (powers of two from one page).

    ``get(n)`` returns a view of exactly ``n`` bytes (contents undefined) and ``put`` takes that view
    back. At most ``keep`` buffers per class are kept; bigger requests than ``max_pooled`` bytes are
    allocated and dropped each time. Thread-safe: ``list.pop``/``append`` are atomic.
    """

    def __init__(self, alignment: int = PAGE_SIZE, keep: int = 32, max_pooled: int = 4 << 20):
        self.alignment = max(alignment, 1)
        self.keep = keep
        self.max_pooled = max_pooled
        self._free: dict[int, list] = {}

    @staticmethod
    def _size_class(n: int) -> int:
        size = PAGE_SIZE
        while size < n:
            size <<= 1
        return size

    def get(self, n: int) -> memoryview:
        if n > self.max_pooled:
            return aligned_buffer(n, self.alignment)
        cls = self._size_class(n)
        free = self._free.get(cls)
        if free:
            try:
                return free.pop()[:n]
            except IndexError:  # another thread took the last one
                pass
        return aligned_buffer(cls, self.alignment)[:n]

    def put(self, view: memoryview) -> None:
        if self.alignment > PAGE_SIZE:
            return
        base = view.obj  # the mmap behind the view: its length is the size class
        n = len(base)
        if n > self.max_pooled:
            return
        free = self._free.setdefault(n, [])
        if len(free) < self.keep:
            free.append(memoryview(base))


class RangeLock:
    """Shared/exclusive byte-range entries with queued (non-blocking) waiters; see the module text.

    ``acquire`` returns a token when the entry is granted at once, or ``None`` after queueing it;
    a queued entry's ``callback(token)`` runs, in the thread that released the last conflicting
    entry, once it is granted. ``release(token)`` ends an entry (it accepts and ignores one extra
    argument so that it can serve as a future's done-callback through ``functools.partial``).

    Plain writes (the hot path) use *slots* instead, which cost no completion callback:
    ``begin_plain`` registers ``slot = [start, end, future, watched]`` before the write is
    submitted, and the caller stores the driver's future in ``slot[2]`` right after submitting.
    A slot counts as a shared entry until its future is done; finished slots are dropped lazily.
    Only when an exclusive entry has to wait for a slot is a callback attached to the slot's
    future: the waiter sets ``slot[3]`` (watched) and attaches it if the future is already
    stored; the submitter, after storing the future, attaches it if ``slot[3]`` is set
    (``plain_submitted``). Under the GIL one of the two always sees the other's store, and
    attaching twice is harmless.
    """

    __slots__ = ("_lock", "_held", "_waiting", "_ids", "_exclusive", "_plain")

    _PRUNE_AT = 64  # plain slots kept before finished ones are swept out

    def __init__(self):
        self._lock = threading.Lock()
        self._held: dict[int, tuple] = {}  # token -> (start, end, exclusive)
        self._waiting: list[
            tuple
        ] = []  # (token, start, end, exclusive, callback), in arrival order
        self._ids = itertools.count(1)
        self._exclusive = 0  # exclusive entries held or queued: 0 lets plain writes skip every scan
        self._plain: list[list] = []  # [start, end, future or None, watched]

    @property
    def busy(self) -> bool:
        live = [s for s in self._plain if s[2] is None or not s[2].done()]
        return bool(self._held or self._waiting or live)

    # -- plain writes ---------------------------------------------------------------------------
    def begin_plain(self, start: int, end: int):
        """A slot for a plain write over [start, end), or ``None`` when an exclusive entry is held
        or queued anywhere (the caller then uses ``acquire``)."""
        with self._lock:
            if self._exclusive:
                return None
            slot = [start, end, None, False]
            plain = self._plain
            plain.append(slot)
            if len(plain) >= self._PRUNE_AT:
                self._plain = [s for s in plain if s[2] is None or not s[2].done()]
            return slot

    def plain_submitted(self, slot, future) -> None:
        """Store the future of a slot's write (callers may inline this when ``slot[3]`` is false)."""
        slot[2] = future
        if slot[3]:
            future.add_done_callback(functools.partial(self._plain_done, slot))

    def plain_failed(self, slot) -> None:
        """The slot's write was never submitted."""
        self._plain_done(slot)

    def _plain_done(self, slot, _future=None) -> None:
        with self._lock:
            self._plain = [s for s in self._plain if s is not slot]
            granted, attach = self._grant_locked()
        self._after(granted, attach)

    # -- entries --------------------------------------------------------------------------------
    def try_shared(self, start: int, end: int):
        """Grant a shared entry if nothing exclusive is held or queued anywhere; else ``None``
        (the caller then uses ``acquire``)."""
        with self._lock:
            if self._exclusive:
                return None
            token = next(self._ids)
            self._held[token] = (start, end, False)
            return token

    def acquire(self, start: int, end: int, exclusive: bool, callback):
        attach = []
        with self._lock:
            token = next(self._ids)
            if exclusive:
                self._exclusive += 1
            if self._conflicts(start, end, exclusive, self._waiting, attach):
                self._waiting.append((token, start, end, exclusive, callback))
                token = None
            else:
                self._held[token] = (start, end, exclusive)
        self._after((), attach)
        return token

    def _conflicts(self, start, end, exclusive, waiting, attach) -> bool:
        for s, e, x in self._held.values():
            if s < end and start < e and (x or exclusive):
                return True
        for _, s, e, x, _ in waiting:
            if s < end and start < e and (x or exclusive):
                return True
        if exclusive:
            found = False
            for slot in self._plain:
                if slot[0] < end and start < slot[1]:
                    fut = slot[2]
                    if fut is not None and fut.done():
                        continue
                    found = True
                    if not slot[3]:
                        slot[3] = True
                        if fut is not None:
                            attach.append(slot)
            return found
        return False

    def _grant_locked(self):
        granted, attach, still = [], [], []
        for w in self._waiting:
            if self._conflicts(w[1], w[2], w[3], still, attach):
                still.append(w)
            else:
                self._held[w[0]] = (w[1], w[2], w[3])
                granted.append(w)
        self._waiting = still
        return granted, attach

    def _after(self, granted, attach) -> None:
        """Outside the lock: watch the slots a waiter depends on, then start the granted."""
        for slot in attach:
            slot[2].add_done_callback(functools.partial(self._plain_done, slot))
        for w in granted:
            w[4](w[0])

    def release(self, token, _future=None) -> None:
        with self._lock:
            entry = self._held.pop(token)
            if entry[2]:
                self._exclusive -= 1
            if not self._waiting:
                return
            granted, attach = self._grant_locked()
        self._after(granted, attach)

"""The L2 table cache: bounded, shared by every request of one image.

Theory of operation
-------------------
Every request needs the L2 table that maps its guest range. Tables live in this cache, keyed by
their offset in the image file, one ``Entry`` per table. The cache is shared by all threads; one
lock (owned by the driver state and passed in, so that allocation bookkeeping and the cache change
together) guards the dictionary and every entry's ``state``, ``holders`` and update queue. The lock
is never held across I/O: a thread that must load or write a table marks the entry (``LOADING``,
``WRITING``), drops the lock, does the I/O, and takes the lock again to record the outcome.

An entry's life (``TRANSITIONS`` below is the whole truth; an illegal move raises)::

      miss                 loaded
   ----------> LOADING -------------> CLEAN <------------------+
                  |                  |    ^                    | written, queue empty
                  | load failed      |    | nothing queued     |
                  v                  |    |                    |
               (gone)       queue    v    |     writer starts  |
                           update   DIRTY ------------------> WRITING
   ----------> DIRTY (a new table,   ^                           |
     create     not yet on disk)     +---------------------------+
                                       written, more queued

* ``LOADING``: one thread (the first to miss) reads the table; everyone else who wants it waits on
  ``entry.loaded`` instead of reading it again, so a table that many requests miss at once is
  loaded once. A failed load removes the entry and fails every waiter.
* ``CLEAN``: ``table`` equals the disk. ``DIRTY``: updates are queued (``queued``: index -> value)
  and not yet being written. ``WRITING``: one writer thread is writing a batch; updates queued
  meanwhile wait for its next batch. A batch becomes visible in ``table`` after its write has
  completed, or, for an allocation without a backing file, once its data is written (the table
  write may still be in flight: see alloc.py); either way a reader never finds a cluster whose
  data is not in the file.
* ``holders`` counts requests using the entry. Eviction removes only ``CLEAN`` entries with no
  holders, least recently used first; when every entry is in use the cache grows past its bound
  for a moment instead of waiting, and shrinks back as entries are released.

The fast path (``peek``) takes no lock: a dict lookup and a use-stamp are atomic enough under the
GIL, a table array is never replaced once an entry leaves ``LOADING``, and an entry a reader holds
stays valid even if evicted a moment later (eviction only forgets it). ``peek`` returns only
entries whose ``table`` is final (not ``LOADING``). Use stamps are approximate under races, which
costs at most an imperfect eviction choice.

Above the cache, the driver remembers the host offsets of allocated clusters it found through
``peek`` (``QedState.hosts``, bounded on its own): a hit never reaches the cache, so a table
whose clusters are all remembered ages here as if unused. Evicting it costs a reload only if a
request needs the table itself (an allocation in it, a cluster not yet remembered).
"""

from __future__ import annotations

from vblock.future import Future

LOADING = "loading"
CLEAN = "clean"
DIRTY = "dirty"
WRITING = "writing"

#: (state, event) -> next state. ``None`` as a state means "not in the cache".
TRANSITIONS = {
    (None, "miss"): LOADING,
    (LOADING, "loaded"): CLEAN,
    (LOADING, "load_failed"): None,
    (None, "create"): DIRTY,
    (CLEAN, "queue"): DIRTY,
    (DIRTY, "queue"): DIRTY,
    (WRITING, "queue"): WRITING,
    (DIRTY, "write_start"): WRITING,
    (WRITING, "written"): CLEAN,
    (WRITING, "written_more"): DIRTY,
    (CLEAN, "evict"): None,
}


class IllegalTransition(RuntimeError):
    pass


class Entry:
    __slots__ = (
        "offset",
        "table",
        "state",
        "holders",
        "loaded",
        "last_use",
        "queued",
        "waiters",
        "new",
        "l1_index",
        "hidden",
    )

    def __init__(self, offset, state):
        self.offset = offset  # bytes: where the table lives in the image file
        self.table = None  # array('Q') once loaded
        self.state = state
        self.holders = 0
        self.loaded = None  # Future: completed when the load ends (None if never loaded)
        self.last_use = 0
        self.queued = {}  # index -> value, waiting for the next write
        self.waiters = []  # futures completed when the queued batch is applied
        self.new = False  # a table being created: not yet written, L1 not yet pointing at it
        # index -> value: updates queued or written to the table in the file whose data write
        # has not finished, so lookups must not see them yet (every table write includes them)
        self.hidden = {}
        self.l1_index = None

    def __repr__(self):
        return f"<L2 {self.offset:#x} {self.state} holders={self.holders}>"


class L2Cache:
    def __init__(self, capacity: int, lock):
        if capacity < 1:
            raise ValueError("the L2 cache needs room for at least one table")
        self.capacity = capacity  # tables
        self.lock = lock
        self._entries: dict[int, Entry] = {}
        self._tick = 0
        self.loads = 0  # tables read from disk (statistics, for tests and benchmarks)

    def __len__(self):
        return len(self._entries)

    def __contains__(self, offset):
        return offset in self._entries

    def get(self, offset):
        return self._entries.get(offset)

    def entries(self):
        return list(self._entries.values())

    @staticmethod
    def move(entry: Entry | None, event: str, state=None):
        """Apply ``event`` to ``entry`` (or to an absent table when ``entry`` is None)."""
        current = entry.state if entry is not None else state
        try:
            nxt = TRANSITIONS[(current, event)]
        except KeyError:
            raise IllegalTransition(
                f"L2 table {entry!r}: event {event!r} in state {current!r}"
            ) from None
        if entry is not None:
            entry.state = nxt
        return nxt

    # -- lock-free fast path ----------------------------------------------------------------
    def peek(self, offset):
        """The table at ``offset`` if cached and final, else None. No lock, no holder."""
        entry = self._entries.get(offset)
        if entry is None or entry.state is LOADING:
            return None
        self._tick += 1
        entry.last_use = self._tick
        return entry.table

    # -- under self.lock ---------------------------------------------------------------------
    def acquire(self, offset) -> tuple[Entry, bool]:
        """Hold the entry for ``offset``; the bool says the caller must load it (then call
        ``loaded`` or ``load_failed``). Others wait with ``wait_loaded`` outside the lock."""
        entry = self._entries.get(offset)
        must_load = False
        if entry is None:
            entry = Entry(offset, self.move(None, "miss"))
            entry.loaded = Future()
            self._entries[offset] = entry
            must_load = True
        entry.holders += 1
        self._tick += 1
        entry.last_use = self._tick
        if must_load:
            self._evict()
        return entry, must_load

    def create(self, offset, table, l1_index) -> Entry:
        """Insert a new, not yet written table (held once by the creator)."""
        entry = Entry(offset, self.move(None, "create"))
        entry.table = table
        entry.new = True
        entry.l1_index = l1_index
        entry.holders = 1
        self._entries[offset] = entry
        self._evict()
        return entry

    def loaded(self, entry: Entry, table) -> Future:
        entry.table = table
        self.move(entry, "loaded")
        self.loads += 1
        return entry.loaded  # the caller completes it outside the lock

    def load_failed(self, entry: Entry) -> Future:
        self.move(entry, "load_failed")
        del self._entries[entry.offset]
        return entry.loaded

    def hold(self, entry: Entry) -> Entry:
        entry.holders += 1
        return entry

    def release(self, entry: Entry) -> None:
        entry.holders -= 1
        if entry.holders < 0:
            raise IllegalTransition(f"{entry!r} released more often than held")
        if len(self._entries) > self.capacity:
            self._evict()

    def drop(self, offset) -> None:
        """Forget a table (used by repair after rewriting tables); it must not be in use."""
        entry = self._entries.pop(offset, None)
        if entry is not None and (entry.holders or entry.state is not CLEAN):
            self._entries[offset] = entry
            raise IllegalTransition(f"cannot drop {entry!r}")

    def clear(self) -> None:
        for offset in list(self._entries):
            self.drop(offset)

    def _evict(self) -> None:
        excess = len(self._entries) - self.capacity
        if excess <= 0:
            return
        idle = [e for e in self._entries.values() if e.holders == 0 and e.state is CLEAN]
        idle.sort(key=lambda e: e.last_use)
        for entry in idle[:excess]:
            self.move(entry, "evict")
            del self._entries[entry.offset]


def wait_loaded(entry: Entry):
    """Outside the lock: wait for another thread's load of ``entry`` (raises its error)."""
    if entry.loaded is not None:
        entry.loaded.result()
    return entry.table

"""The table writer: batched L2 and L1 updates, ordered flushes, and the sticky metadata error.

Contract
--------
* **Who calls it, on which thread.** Allocations (``alloc.py``) queue table updates from any
  thread: a pool thread, the calling thread of an inline allocation, or an I/O completion. The
  writer itself runs on I/O completions: the first update to find a table idle starts its
  writer, which writes one batch after another until the table's queue is empty. No thread waits
  for it; a caller that wants to block asks for a future.
* **Locks.** Table state changes under ``QedState.lock`` (the cache's lock), which is never held
  across I/O. The ordered-flush round has its own small lock (``_flush_lock``), never held with
  ``QedState.lock`` and never across I/O either.
* **Batches.** Updates that arrive while a table is being written wait for that write and go out
  together in the next one, rounded out to whole ``meta_align`` blocks (``tables.encode_slice``).
  A batch becomes visible in the cached table only once its write has completed (updates marked
  ``hidden`` stay invisible longer: see ``alloc.WriteBackAllocation``); a failed write fails its
  batch and leaves the cached table as it was.
* **Write ordering.** A new L2 table is written whole, flushed (unless cache="unsafe"), and only
  then pointed at by its L1 entry: L2 before L1. ``ordered_flush`` gives allocations over a backing
  file their "data, then flush, then L2" step: its callback runs after a flush that started after
  the call, so everything completed before the call is durable by then.
* **The sticky metadata error.** A write-back allocation is acknowledged before its table write
  ends (``QedState.unwritten`` lists those writes). If such a write fails, the acknowledged data
  has no mapping in the file: ``flush`` then fails with that error (``QedState.meta_error``) from
  then on, and so does close, until the image is reopened and repaired. Nothing is acknowledged
  as durable while a table it depends on is not.
"""

from __future__ import annotations

import threading

from vblock.future import Future, completed, failed, join, then

from . import tables
from .cache import WRITING


def completer(fut):
    """A table-writer callback that completes ``fut``."""

    def complete(err):
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)

    return complete


class TableWriter:
    """Writes queued table updates and shares flushes for one image (see the module docstring)."""

    def __init__(self, st):
        self.st = st
        self._meta_free = {}  # length -> aligned buffers for table writes (list ops are atomic)
        self._flush_lock = threading.Lock()  # the ordered-flush round (data -> flush -> L2)
        self._flush_waiters = []
        self._flush_running = False

    # -- table updates -------------------------------------------------------------------------
    def update(self, entry, updates, event, callback=None, hidden=False):
        """Queue ``updates`` (index -> value) for ``entry``'s table. Once they are written and
        visible, ``callback(error or None)`` runs (on an I/O completion); without a callback a
        future is returned instead. With ``hidden`` the updates are written but stay invisible
        to lookups until their allocation ends (``alloc.WriteBackAllocation``: the data write is
        still running)."""
        fut = None
        if callback is None:
            fut = Future()
            callback = completer(fut)
        st = self.st
        with st.lock:
            if hidden:
                entry.hidden.update(updates)
            entry.queued.update(updates)
            entry.waiters.append(callback)
            start = entry.state is not WRITING
            if start:
                st.cache.move(entry, "queue")
                st.cache.move(entry, "write_start")
                batch, waiters = entry.queued, entry.waiters
                entry.queued, entry.waiters = {}, []
        if start:
            self._write_batch(entry, batch, waiters, event)
        return fut

    def _write_batch(self, entry, batch, waiters, event):
        """Write one batch of ``entry``'s queued updates; ``_batch_done`` follows on completion."""
        st = self.st
        f = st.f
        buf = None

        def done(fut):
            self._meta_release(buf)
            self._batch_done(entry, batch, waiters, event, fut.exception())

        try:
            # Every write of the table carries the hidden updates that fall inside it.
            overlay = {**entry.hidden, **batch} if entry.hidden else batch
            if entry.new:
                table = entry.table[:]
                for i, v in overlay.items():
                    table[i] = v
                data = tables.encode(table)
                buf = self._meta_buffer(data)
                st.event("L2_ALLOC")
                fut = f.submit_write(entry.offset, [buf])
                fut = then(fut, self._after_new_table, entry)
            else:
                off, data = tables.encode_slice(
                    entry.table, min(batch), max(batch) + 1, st.meta_align, overlay
                )
                buf = self._meta_buffer(data)
                st.event(event)
                fut = f.submit_write(entry.offset + off, [buf])
            # The batch's requests wait for this write: it goes to the kernel now, not after the
            # other callbacks of the completion batch that started it.
            f.push()
        except BaseException as exc:
            self._meta_release(buf)
            self._batch_done(entry, batch, waiters, event, exc)
            return
        fut.add_done_callback(done)

    def _after_new_table(self, entry):
        """A new table is written: flush it, then point its L1 entry at it."""
        st = self.st
        if st.unsafe:
            return self.update(st.l1_entry, {entry.l1_index: entry.offset}, "L1_UPDATE")
        st.event("L2_FLUSH")
        return then(
            st.f.submit_flush(),
            self.update,
            st.l1_entry,
            {entry.l1_index: entry.offset},
            "L1_UPDATE",
        )

    def _meta_buffer(self, data):
        """An aligned buffer holding ``data``, from a free list (allocating aligned memory costs
        more than the rest of a table update); give it back with ``_meta_release``."""
        free = self._meta_free.get(len(data))
        try:
            buf = free.pop()
        except (AttributeError, IndexError):
            buf = self.st.f.alloc(len(data))
        buf[:] = data
        return buf

    def _meta_release(self, buf):
        if buf is not None and len(buf) <= self.st.meta_align * 4:
            free = self._meta_free.setdefault(len(buf), [])
            if len(free) < 8:
                free.append(buf)

    def _batch_done(self, entry, batch, waiters, event, err):
        st = self.st
        with st.lock:
            if err is None:
                table = entry.table
                hidden = entry.hidden
                for i, v in batch.items():
                    if i not in hidden:
                        table[i] = v
                if entry.new:
                    entry.new = False
                    if st.creating.get(entry.l1_index) is entry:
                        del st.creating[entry.l1_index]
            nbatch, nwaiters = entry.queued, entry.waiters
            entry.queued, entry.waiters = {}, []
            if nwaiters:
                st.cache.move(entry, "written_more")
                st.cache.move(entry, "write_start")
            else:
                st.cache.move(entry, "written")
        # The next batch goes out first: the callbacks of this one's requests would otherwise
        # delay it by their whole run (completing them and starting the next requests).
        if nwaiters:
            self._write_batch(entry, nbatch, nwaiters, event)
        for w in waiters:
            w(err)

    # -- flushes -------------------------------------------------------------------------------
    def ordered_flush(self, callback):
        """Run ``callback(error or None)`` after a flush that started after this call (data ->
        flush -> L2 with a backing file). Concurrent callers share flushes: while one is in
        flight, the next round collects everyone who arrives meanwhile."""
        with self._flush_lock:
            self._flush_waiters.append(callback)
            if self._flush_running:
                return
            self._flush_running = True
        self._flush_round()

    def _flush_round(self):
        with self._flush_lock:
            waiters, self._flush_waiters = self._flush_waiters, []
            if not waiters:
                self._flush_running = False
                return

        def done(f):
            err = f.exception()
            for w in waiters:
                w(err)
            self._flush_round()

        self.st.event("DATA_FLUSH")
        try:
            fut = self.st.f.submit_flush()
        except BaseException as exc:
            fut = failed(exc)
        fut.add_done_callback(done)

    def flush(self):
        """The image's flush: the host file's, after the table writes of every allocation
        acknowledged so far; failed with the sticky metadata error once there is one. With
        cache="unsafe" the host file is not flushed, but the table writes are still waited for
        and their failure reported."""
        st = self.st
        with st.lock:
            written = list(st.unwritten.values())
        if not written:
            return self._flush_checked()
        # Tracked, so that close() waits for the host flush this starts later.
        return st.track(then(join(written, None), self._flush_checked))

    def _flush_checked(self):
        st = self.st
        err = st.meta_error
        if err is not None:
            return failed(err)
        if st.unsafe:
            return completed(None)
        return st.f.submit_flush()

"""The copy engine: what one open image reads as, written into another, data only.

``convert(src, dst, ...)`` copies the virtual contents of ``src`` into ``dst``, both open
``Image`` objects (the caller opens, creates and closes them; ``vblock convert`` in the CLI
decides where the destination lives and reports progress). It is the engine of ``vblock
convert`` and of the conversion benchmark.

What is copied. The source's block status (QED tables, SEEK_DATA/SEEK_HOLE on raw files) says
where its data is, ``WINDOW`` bytes at a time; only data runs are read. Inside data, every
granule of the destination's cluster size (4 KiB for formats without clusters) that holds only
zeros is skipped, since a new image reads as zeros there. Two settings change that:

* ``keep_backing``: only ``src``'s top layer is copied (its own DATA and ZERO runs; the caller
  gives ``dst`` the backing file), and zeros are written explicitly, so that they keep hiding the
  backing file.
* ``zero_init=False`` (a device, or an existing image written in place): ``dst`` does not read as
  zeros, so every zero of the flattened source is written too, inside data and out.

Requests in flight. The calling thread plans the copy and submits it in chunks of at most
``CHUNK`` bytes, blocking while ``depth`` chunks are in flight; a chunk holds its slot from its
read until the last of its writes completes. Completions run on whatever thread the images
complete on (the reads' callbacks submit the writes). A raw source that lives in a regular file
read through the page cache is mapped instead of read (``vblock.hostio.mapping``): the writes take
views of the mapping, so each byte is copied once, page cache to page cache. The first error of
any request stops the submission of new chunks; ``convert`` waits for what is in flight and
raises that error.

Durability follows the destination's cache mode (``dst.options.cache``), with ``qemu-img
convert``'s meanings:

* ``unsafe``: nothing is flushed; until the kernel writes its page cache back, a host crash may
  lose part of ``dst``;
* ``writeback``: the destination's writeback is started every ``WRITE_BEHIND`` bytes submitted,
  so that the disk works while the copy goes on instead of leaving everything to the end, and
  ``dst`` is flushed once the copy is done: it is durable when ``convert`` returns;
* ``none`` (O_DIRECT): ``dst`` is flushed once the copy is done (its device cache), and is
  durable when ``convert`` returns.

``convert`` flushes nothing else and never closes either image.
"""

from __future__ import annotations

import dataclasses
import threading

from vblock.block.interface import DATA, UNALLOCATED, ZERO
from vblock.hostio import alloc_buffer
from vblock.hostio.mapping import FileMapping, zero_granules

__all__ = [
    "CHUNK",
    "DEFAULT_DEPTH",
    "WINDOW",
    "WRITE_BEHIND",
    "ZERO_GRANULE",
    "ConvertStats",
    "convert",
]

CHUNK = 2 << 20  # bytes per read request
WRITE_BEHIND = 64 << 20  # bytes submitted between two starts of the destination's writeback
WINDOW = 1 << 30  # bytes of block status asked at a time
DEFAULT_DEPTH = 16  # chunks in flight
ZERO_GRANULE = 4096  # bytes: zero detection unit for a destination without clusters


@dataclasses.dataclass(frozen=True)
class ConvertStats:
    """What a conversion went through, in bytes."""

    planned: int  # the runs planned: data to read and zeros to write
    copied: int  # written as data
    zero_skipped: int  # zero granules found inside data runs (skipped, or written as zeros)


class _Copier:
    """Reads chunks of the source and writes their non-zero parts, ``depth`` chunks in flight.

    With ``mapping`` (a ``FileMapping`` of a raw source) chunks are not read into buffers: the
    writes take views of the mapping, so each byte is copied once (page cache to page cache)."""

    def __init__(self, src, dst, depth, granule, mask_zeros, advance, mapping=None):
        self.src = src
        self.dst = dst
        self.granule = granule  # bytes: zero detection unit (the destination's cluster)
        self.mask_zeros = mask_zeros  # write zeros explicitly (a backing file would show through)
        self.advance = advance
        self.mapping = mapping
        self.slots = threading.Semaphore(depth)
        self.buffers = [] if mapping is not None else [alloc_buffer(CHUNK) for _ in range(depth)]
        self.lock = threading.Lock()
        self.pending = 0
        self.idle = threading.Event()
        self.idle.set()
        self.error = None
        self.copied = 0  # bytes written as data
        self.skipped = 0  # bytes of zeros found inside data

    def _fail(self, exc):
        with self.lock:
            if self.error is None:
                self.error = exc

    def _start(self):
        """Take a slot (blocks while ``depth`` chunks are in flight) and a buffer if reading."""
        self.slots.acquire()
        if self.error is not None:
            self.slots.release()
            raise self.error
        with self.lock:
            buf = self.buffers.pop() if self.buffers else None
            self.pending += 1
            self.idle.clear()
        return buf

    def _finish(self, buf, nbytes, offset=None):
        if offset is not None and self.mapping is not None:
            self.mapping.release(offset, nbytes)
        with self.lock:
            if buf is not None:
                self.buffers.append(buf)
            self.pending -= 1
            if self.pending == 0:
                self.idle.set()
        if self.advance is not None:
            self.advance(nbytes)
        self.slots.release()

    def copy(self, offset, length):
        """Queue [offset, offset+length) (at most CHUNK bytes) for copying; blocks for a slot."""
        buf = self._start()
        if self.mapping is not None:
            self._write_chunk(buf, self.mapping.view(offset, length), offset, length)
            return
        view = buf[:length]
        try:
            fut = self.src.submit_read(offset, view)
        except BaseException:
            self._finish(buf, 0)
            raise
        fut.add_done_callback(lambda f: self._read_done(f, buf, view, offset, length))

    def zeroes(self, offset, length):
        """Write zeros over [offset, offset+length); blocks for a slot."""
        buf = self._start()
        try:
            fut = self.dst.submit_write_zeroes(offset, length)
        except BaseException:
            self._finish(buf, 0)
            raise
        fut.add_done_callback(lambda f: self._written(f, buf, length))

    def _read_done(self, fut, buf, view, offset, length):
        exc = fut.exception()
        if exc is not None:
            self._fail(exc)
            self._finish(buf, length)
            return
        self._write_chunk(buf, view, offset, length)

    def _write_chunk(self, buf, view, offset, length):
        """Write the chunk's data; the slot (and ``buf``) are given back when every write is done."""
        try:
            futs = self._write_parts(view, offset, length)
        except BaseException as exc:
            self._fail(exc)
            self._finish(buf, length, offset)
            return
        if not futs:
            self._finish(buf, length, offset)
            return
        state = [len(futs)]
        lock = threading.Lock()

        def one(f):
            exc = f.exception()
            if exc is not None:
                self._fail(exc)
            with lock:
                state[0] -= 1
                last = state[0] == 0
            if last:
                self._finish(buf, length, offset)

        for f in futs:
            f.add_done_callback(one)

    def _written(self, fut, buf, length):
        exc = fut.exception()
        if exc is not None:
            self._fail(exc)
        self._finish(buf, length)

    def _write_parts(self, view, offset, length):
        """Submit writes for the non-zero granules of ``view`` (and write-zeroes for the zero ones
        when masking); returns the futures."""
        g = self.granule
        copied = skipped = 0
        futs = []
        start = None  # start of the current non-zero stretch (relative)
        zstart = None
        pos = 0
        for is_zero in zero_granules(view, g):
            n = min(g, length - pos)
            if is_zero:
                if start is not None:
                    futs.append(self.dst.submit_write(offset + start, view[start:pos]))
                    copied += pos - start
                    start = None
                if zstart is None:
                    zstart = pos
                skipped += n
            else:
                if zstart is not None:
                    if self.mask_zeros:
                        futs.append(self.dst.submit_write_zeroes(offset + zstart, pos - zstart))
                    zstart = None
                if start is None:
                    start = pos
            pos += n
        if start is not None:
            futs.append(self.dst.submit_write(offset + start, view[start:length]))
            copied += length - start
        if zstart is not None and self.mask_zeros:
            futs.append(self.dst.submit_write_zeroes(offset + zstart, length - zstart))
        with self.lock:
            self.copied += copied
            self.skipped += skipped
        return futs

    def wait(self):
        """Block until nothing is in flight; raise the first error any request met."""
        self.idle.wait()
        if self.error is not None:
            raise self.error


def _plan(src, keep_backing=False, zero_init=True):
    """Yield (offset, length, kind) runs to copy: kind DATA (read and copy) or ZERO (write zeros).
    With ``keep_backing`` only the top layer is read and its ZERO runs are written (they hide the
    backing file). Otherwise the whole chain is flattened, and its zeros are written only where the
    destination does not read as zeros already (``zero_init`` False)."""
    size = src.size
    pos = 0
    while pos < size:
        n = min(WINDOW, size - pos)
        runs = src.driver.block_status(pos, n) if keep_backing else src.block_status(pos, n)
        for r in runs:
            if r.kind == DATA:
                yield r.offset, r.length, DATA
            elif r.kind == ZERO and (keep_backing or not zero_init):
                yield r.offset, r.length, ZERO
            elif r.kind == UNALLOCATED and not keep_backing and not zero_init:
                yield r.offset, r.length, ZERO
            else:
                assert r.kind in (ZERO, UNALLOCATED)
        pos += n


def _mapping_of(src):
    """A ``FileMapping`` of ``src`` when it is a raw regular file read through the page cache (its
    bytes can then be written out without a read copy), else None."""
    if src.format != "raw" or src.size == 0:
        return None
    f = src.driver.hostfile
    if f.direct or f.is_block_device:
        return None
    try:
        return FileMapping(f.path, src.size)
    except OSError:
        return None  # a file system that cannot map: read it instead


def convert(
    src, dst, *, keep_backing=False, zero_init=True, depth=DEFAULT_DEPTH, progress=None
) -> ConvertStats:
    """Copy what ``src`` reads as into ``dst`` (see the module docstring); returns the statistics.

    ``src`` and ``dst`` are open ``Image`` objects, ``dst`` writable and at least as large as
    ``src`` (else ``ValueError``, before anything is written). ``depth``: chunks in flight, at
    least 1. ``progress``, if given, is called once from the calling thread with the number of
    bytes planned, before the first request, and returns a function that is then called from any
    thread with each number of bytes done (the amounts add up to the total planned on success).
    Raises the first error a request met (``OSError`` with its errno, ``ImageError``), after
    every request in flight has completed."""
    if depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}")
    if dst.size < src.size:
        raise ValueError(
            f"{dst.path} is smaller ({dst.size} bytes) than the source ({src.size} bytes)"
        )
    cache = dst.options.cache
    granule = dst.info().get("cluster-size") or ZERO_GRANULE
    runs = list(_plan(src, keep_backing, zero_init))
    planned = sum(n for _, n, _ in runs)
    advance = progress(planned) if progress is not None else None
    mask = keep_backing or not zero_init  # zeros inside data are written too
    copier = _Copier(src, dst, depth, granule, mask, advance, _mapping_of(src))
    # Before the final flush of a writeback destination, start its writeback as the copy goes:
    # the disk is busy meanwhile, and the flush finds little left to write.
    behind = WRITE_BEHIND if cache == "writeback" else None
    since = 0
    try:
        for off, length, kind in runs:
            end = off + length
            while off < end:
                n = min(CHUNK - off % CHUNK, end - off)
                if kind == DATA:
                    copier.copy(off, n)
                else:
                    copier.zeroes(off, n)
                off += n
                since += n
                if behind is not None and since >= behind:
                    dst.start_writeback()
                    since = 0
    except BaseException:
        copier.idle.wait()  # nothing is left in flight once convert raises
        raise
    copier.wait()
    if cache != "unsafe":
        dst.flush()
    return ConvertStats(planned, copier.copied, copier.skipped)

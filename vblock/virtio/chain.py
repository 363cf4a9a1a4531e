"""Descriptor chains: where a split-virtqueue chain is walked and validated - the reference.

(``native/vring.c`` walks standard read and write requests by the same rules for the device's
fast path, ``blk_request.frame_reader``; a property test holds the two together, and every chain
the native walker declines comes here.)

A chain starts at a head index taken from the available ring and follows ``next`` through the
descriptor table, possibly switching once into an indirect table. :func:`walk` reads each
descriptor exactly once into locals (the guest may rewrite the table while we look, so nothing is
read twice), checks it against the rules below, and maps its buffer to a zero-copy view of guest
memory. The first violation ends the walk with an exception; nothing is written anywhere.

Rules, each with its clause (virtio 1.2):

* the head and every ``next`` index < table size (2.7.5: "next" names a descriptor of the table;
  a head out of range is a ring error, :class:`RingError`, since it cannot even be returned);
* at most ``queue_size`` descriptors in the direct part of a chain, and inside an indirect table
  at most its ``len / 16`` entries (2.7.5.3.1: no chain longer than the queue; 2.7.5.2: loops are
  forbidden - the count bounds them without a visited set);
* INDIRECT only if VIRTIO_F_INDIRECT_DESC was negotiated (2.7.5.3.1), never together with NEXT,
  never inside an indirect table, table ``len`` a non-zero multiple of 16 with at most
  ``indirect_max`` entries (2.7.5.3.1; the device MUST ignore WRITE on the table's descriptor);
* device-readable descriptors before device-writable ones (2.7.4.2);
* no zero-length buffer (2.7.5);
* the total length of the chain below 2^32 (2.7.5.2: "the total length of a descriptor chain
  MUST NOT exceed 2^32");
* every buffer inside guest memory without wrapping 2^64 (2.7.5: addr/len describe a buffer in
  guest memory) - a *fault*, see below.

``ChainError`` means the frame cannot be answered in-band (no status byte can be trusted): the
device returns the head to the used ring with length 0 and writes nothing. ``RingError`` means the
ring itself is broken: the device sets DEVICE_NEEDS_RESET.

A buffer outside guest memory (or wrapping 2^64) in a chain that breaks no other rule is a fault
the device can still answer when the chain's last device-writable buffer - the one that holds a
request's status byte - lies inside guest memory: the walk then returns a chain whose ``fault``
names the first such buffer and whose ``writable`` holds only that last buffer (``readable`` is
empty), so the device answers IOERR in its last byte (as Firecracker does; a guest must never read
a stale status for a request that never ran). When that last writable buffer is itself outside
memory, or there is none, the fault is a ``ChainError``.
"""

from __future__ import annotations

from vblock.errors import GuestError
from vblock.virtio.memory import GuestMemoryError
from vblock.virtio.spec import (
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_DESC_SIZE,
    virtq_desc,
)

__all__ = [
    "ChainError",
    "RingError",
    "DescriptorChain",
    "walk",
    "walk_packed",
    "split_front",
    "split_back",
    "gather",
]

_unpack_desc = virtq_desc.unpack_from
_TOTAL_LIMIT = 1 << 32


class ChainError(GuestError):
    """A descriptor chain breaks a rule of 2.7.4/2.7.5. No status byte can be trusted, so the
    device answers by returning the head with used length 0 and writing nothing (``status`` is
    ``None`` because no status is written; the queue goes on serving)."""


class RingError(GuestError):
    """The ring itself is broken (avail index far ahead, head out of range, rings outside
    memory): the device sets DEVICE_NEEDS_RESET (``status`` None, as ``GuestError`` says)."""


class DescriptorChain:
    """A walked, validated chain: ``readable`` and ``writable`` are lists of memoryviews into guest
    memory, in chain order; ``readable_bytes`` / ``writable_bytes`` their total lengths.

    ``fault`` is None for a chain whose every buffer lies in guest memory. Otherwise it says which
    buffer does not, and the chain holds only its last writable buffer (``writable`` of one view,
    inside guest memory; ``readable`` empty; the byte counts those of the views held): the device
    answers with an error in that buffer's last byte and moves no data."""

    __slots__ = ("head", "readable", "writable", "readable_bytes", "writable_bytes", "fault")

    def __init__(self, head, readable, writable, readable_bytes, writable_bytes, fault=None):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_bytes = readable_bytes
        self.writable_bytes = writable_bytes
        self.fault = fault

    def __repr__(self):
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_bytes}B"
            f"/{len(self.readable)}, writable={self.writable_bytes}B/{len(self.writable)})"
        )


def walk(mem, table, queue_size, head, indirect_ok, indirect_max):
    """Walk the chain at ``head`` of descriptor ``table`` (a memoryview of ``queue_size``
    descriptors) over guest memory ``mem``.

    Returns a :class:`DescriptorChain` (with ``fault`` set for a buffer outside guest memory
    when the status can still be answered). Raises :class:`RingError` if ``head >= queue_size``
    and :class:`ChainError` for every other rule in the module docstring. Any other exception is
    a bug.
    """
    if head >= queue_size:
        raise RingError(
            f"head index {head} >= queue size {queue_size}"
        )  # 2.7.6 ring[] names a head
    readable = []
    writable = []
    rbytes = wbytes = 0
    fault = None  # the first buffer outside guest memory; the walk goes on to find the status
    ttl = queue_size  # 2.7.5.3.1: the direct part of a chain is at most queue_size descriptors
    n = queue_size
    idx = head
    in_indirect = False
    base0 = mem._base0
    end0 = mem._end0
    view0 = mem._view0
    while True:
        if ttl == 0:
            raise ChainError(f"chain from head {head} is longer than its table allows (loop?)")
        ttl -= 1
        addr, length, flags, nxt = _unpack_desc(table, idx * VIRTQ_DESC_SIZE)  # read once
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect_ok:
                raise ChainError(
                    "INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated"
                )  # 2.7.5.3.1
            if in_indirect:
                raise ChainError("INDIRECT descriptor inside an indirect table")  # 2.7.5.3.1
            if flags & VIRTQ_DESC_F_NEXT:
                raise ChainError("INDIRECT and NEXT both set")  # 2.7.5.3.1
            table, n = _indirect_table(mem, addr, length, indirect_max)
            in_indirect = True
            ttl = n  # 2.7.5.3.2: the table is walked from entry 0, at most n entries
            idx = 0
            continue
        if length == 0:
            raise ChainError(f"zero-length buffer in descriptor {idx}")
        end = addr + length
        if addr >= base0 and end <= end0:
            off = addr - base0
            buf = view0[off : off + length]
        else:
            try:
                buf = mem.view(addr, length)
            except GuestMemoryError as exc:
                buf = None
                if fault is None:
                    fault = f"descriptor {idx}: {exc}"
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append(buf)
            wbytes += length
        else:
            if writable:
                raise ChainError(f"readable descriptor {idx} after a writable one")  # 2.7.4.2
            readable.append(buf)
            rbytes += length
        if not flags & VIRTQ_DESC_F_NEXT:
            if (
                rbytes + wbytes >= _TOTAL_LIMIT
            ):  # each len < 2^32 and at most 2^15 of them: no overflow
                raise ChainError("chain length exceeds 2^32 bytes")  # 2.7.5.2
            if fault is not None:
                return _faulted(head, writable, fault)
            return DescriptorChain(head, readable, writable, rbytes, wbytes)
        if nxt >= n:
            raise ChainError(f"next index {nxt} >= table size {n}")  # 2.7.5
        idx = nxt


def _faulted(head, writable, fault):
    """The answerable remains of a chain with a buffer outside guest memory (see the module
    docstring), or ``ChainError`` when its last writable buffer is missing or outside too."""
    last = writable[-1] if writable else None
    if last is None:
        raise ChainError(fault)
    return DescriptorChain(head, [], [last], 0, len(last), fault)


def _indirect_table(mem, addr, length, indirect_max):
    """The view and entry count of an indirect table (2.7.5.3.1 / 2.8.19): ``len`` a non-zero
    multiple of 16, at most ``indirect_max`` entries, inside guest memory."""
    if length == 0 or length % VIRTQ_DESC_SIZE:
        raise ChainError(f"indirect table length {length} is not a non-zero multiple of 16")
    n = length // VIRTQ_DESC_SIZE
    if n > indirect_max:
        raise ChainError(f"indirect table of {n} entries exceeds {indirect_max}")
    try:
        return mem.view(addr, length), n
    except GuestMemoryError as exc:
        raise ChainError(f"indirect table: {exc}") from None


def walk_packed(mem, ring, size, pos, indirect_ok, indirect_max):
    """Walk the packed-ring chain whose first descriptor is at ring position ``pos`` (2.8).

    The chain is the run of descriptors from ``pos`` (wrapping at ``size``) up to the first one
    without NEXT; its buffer ID is the ``id`` of that last descriptor (2.8.6). The caller has
    checked that the first one is available. Returns ``(buffer_id, ring_descs, chain)``.

    Rules beyond :func:`walk`'s (which apply to buffers here too): the run must end within
    ``size`` descriptors, or its extent is unknown and nothing can be returned - a
    :class:`RingError`; an INDIRECT descriptor must be the only ring descriptor of its chain
    (2.8.19: never with NEXT) and its table entries are read in order, ignoring their NEXT
    (2.8.19). Any other violation raises :class:`ChainError` carrying ``buffer_id`` and
    ``ring_descs`` so the device can still return the buffer with used length 0; a buffer outside
    guest memory gives a chain with ``fault`` set, as :func:`walk` does.
    """
    # 1. the extent: flags are read once here, buffers below from the same single read
    descs = []
    p = pos
    while True:
        if len(descs) == size:
            raise RingError(
                f"packed chain at {pos} does not end within the ring of {size}"
            )  # 2.8.18
        d = _unpack_desc(ring, p * VIRTQ_DESC_SIZE)  # addr, len, id, flags
        descs.append(d)
        p = p + 1 if p + 1 < size else 0
        if not d[3] & VIRTQ_DESC_F_NEXT:
            break
    buffer_id = descs[-1][2]
    ndesc = len(descs)
    try:
        chain = _packed_buffers(mem, descs, indirect_ok, indirect_max)
    except ChainError as exc:
        exc.buffer_id = buffer_id
        exc.ring_descs = ndesc
        raise
    chain.head = buffer_id
    return buffer_id, ndesc, chain


def _packed_buffers(mem, descs, indirect_ok, indirect_max):
    first = descs[0]
    if first[3] & VIRTQ_DESC_F_INDIRECT:
        if not indirect_ok:
            raise ChainError("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")
        if len(descs) > 1:
            raise ChainError("INDIRECT and NEXT both set")  # 2.8.19
        table, n = _indirect_table(mem, first[0], first[1], indirect_max)
        descs = [_unpack_desc(table, i * VIRTQ_DESC_SIZE) for i in range(n)]  # read once
        for d in descs:
            if d[3] & VIRTQ_DESC_F_INDIRECT:
                raise ChainError("INDIRECT descriptor inside an indirect table")  # 2.8.19
    elif any(d[3] & VIRTQ_DESC_F_INDIRECT for d in descs):
        raise ChainError("INDIRECT descriptor after chained descriptors")  # 2.8.19
    readable = []
    writable = []
    rbytes = wbytes = 0
    fault = None
    for i, (addr, length, _id, flags) in enumerate(descs):
        if length == 0:
            raise ChainError(f"zero-length buffer in descriptor {i} of the chain")
        try:
            buf = mem.view(addr, length)
        except GuestMemoryError as exc:
            buf = None
            if fault is None:
                fault = f"descriptor {i} of the chain: {exc}"
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append(buf)
            wbytes += length
        else:
            if writable:
                raise ChainError(f"readable descriptor {i} after a writable one")  # 2.8.17
            readable.append(buf)
            rbytes += length
    if rbytes + wbytes >= _TOTAL_LIMIT:
        raise ChainError("chain length exceeds 2^32 bytes")
    if fault is not None:
        return _faulted(None, writable, fault)
    return DescriptorChain(None, readable, writable, rbytes, wbytes)


# -- cursors: the readable / writable parts as one byte stream ---------------------------------


def split_front(views, nbytes):
    """Split a list of views after ``nbytes`` bytes: ``(front, back)`` lists of views. The caller
    has checked that the views hold at least ``nbytes``."""
    first = views[0]
    if len(first) == nbytes:  # fast path: the driver gave the piece its own descriptor
        return [first], views[1:]
    if len(first) > nbytes:
        return [first[:nbytes]], [first[nbytes:], *views[1:]]
    front = []
    for i, v in enumerate(views):
        if nbytes == 0:
            return front, views[i:]
        if len(v) <= nbytes:
            front.append(v)
            nbytes -= len(v)
        else:
            front.append(v[:nbytes])
            return front, [v[nbytes:], *views[i + 1 :]]
    return front, []


def split_back(views, nbytes):
    """Split a list of views ``nbytes`` before its end: ``(front, back)``."""
    last = views[-1]
    if len(last) == nbytes:
        return views[:-1], [last]
    if len(last) > nbytes:
        cut = len(last) - nbytes
        return [*views[:-1], last[:cut]], [last[cut:]]
    total = sum(len(v) for v in views)
    return split_front(views, total - nbytes)


def gather(views):
    """The bytes of a list of views (a copy; for small metadata such as headers and segments)."""
    if len(views) == 1:
        return views[0].tobytes()
    return b"".join(views)

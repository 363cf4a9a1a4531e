"""Descriptor chains: the one place where a split-virtqueue chain is walked and validated.

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
* no zero-length buffer, and every buffer inside guest memory without wrapping 2^64
  (2.7.5: addr/len describe a buffer in guest memory);
* the total length of the chain below 2^32 (2.7.5.2: "the total length of a descriptor chain
  MUST NOT exceed 2^32").

``ChainError`` means the frame cannot be answered in-band (no status byte can be trusted): the
device returns the head to the used ring with length 0 and writes nothing. ``RingError`` means the
ring itself is broken: the device sets DEVICE_NEEDS_RESET.
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

__all__ = ["ChainError", "RingError", "DescriptorChain", "walk", "split_front", "split_back", "gather"]

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
    memory, in chain order; ``readable_bytes`` / ``writable_bytes`` their total lengths."""

    __slots__ = ("head", "readable", "writable", "readable_bytes", "writable_bytes")

    def __init__(self, head, readable, writable, readable_bytes, writable_bytes):
        self.head = head
        self.readable = readable
        self.writable = writable
        self.readable_bytes = readable_bytes
        self.writable_bytes = writable_bytes

    def __repr__(self):
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable_bytes}B"
            f"/{len(self.readable)}, writable={self.writable_bytes}B/{len(self.writable)})"
        )


def walk(mem, table, queue_size, head, indirect_ok, indirect_max):
    """Walk the chain at ``head`` of descriptor ``table`` (a memoryview of ``queue_size``
    descriptors) over guest memory ``mem``.

    Returns a :class:`DescriptorChain`. Raises :class:`RingError` if ``head >= queue_size`` and
    :class:`ChainError` for every other rule in the module docstring. Any other exception is a bug.
    """
    if head >= queue_size:
        raise RingError(f"head index {head} >= queue size {queue_size}")  # 2.7.6 ring[] names a head
    readable = []
    writable = []
    rbytes = wbytes = 0
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
                raise ChainError("INDIRECT descriptor but VIRTIO_F_INDIRECT_DESC not negotiated")  # 2.7.5.3.1
            if in_indirect:
                raise ChainError("INDIRECT descriptor inside an indirect table")  # 2.7.5.3.1
            if flags & VIRTQ_DESC_F_NEXT:
                raise ChainError("INDIRECT and NEXT both set")  # 2.7.5.3.1
            if length == 0 or length % VIRTQ_DESC_SIZE:
                raise ChainError(f"indirect table length {length} is not a non-zero multiple of 16")
            n = length // VIRTQ_DESC_SIZE
            if n > indirect_max:
                raise ChainError(f"indirect table of {n} entries exceeds {indirect_max}")
            try:
                table = mem.view(addr, length)
            except GuestMemoryError as exc:
                raise ChainError(f"indirect table: {exc}") from None
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
                raise ChainError(f"descriptor {idx}: {exc}") from None
        if flags & VIRTQ_DESC_F_WRITE:
            writable.append(buf)
            wbytes += length
        else:
            if writable:
                raise ChainError(f"readable descriptor {idx} after a writable one")  # 2.7.4.2
            readable.append(buf)
            rbytes += length
        if not flags & VIRTQ_DESC_F_NEXT:
            if rbytes + wbytes >= _TOTAL_LIMIT:  # each len < 2^32 and at most 2^15 of them: no overflow
                raise ChainError("chain length exceeds 2^32 bytes")  # 2.7.5.2
            return DescriptorChain(head, readable, writable, rbytes, wbytes)
        if nxt >= n:
            raise ChainError(f"next index {nxt} >= table size {n}")  # 2.7.5
        idx = nxt


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

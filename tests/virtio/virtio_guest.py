"""Helpers for tests that play a hostile guest: raw descriptors, guarded buffers, and a check that
the device wrote nothing outside the writable buffers it was given."""

from __future__ import annotations

from vblock.virtio import spec as S

GUARD = 64  # bytes of pattern on each side of every test buffer
PATTERN = 0xA5


class Guest:
    """Raw access to queue ``q`` of a started ``Stack``."""

    def __init__(self, stack, q=0):
        self.stack = stack
        self.mem = stack.mem
        self.drv = stack.drv
        self.dq = stack.drv.queues[q]
        self.alloc = stack.drv.allocator.alloc
        self.writable = []  # (addr, len) the device may write in the current request

    def buf(self, nbytes, content=None, writable=False):
        """A buffer of ``nbytes`` with ``GUARD`` pattern bytes on both sides; returns its address."""
        base = self.alloc(nbytes + 2 * GUARD)
        self.mem.write(base, bytes([PATTERN]) * (nbytes + 2 * GUARD))
        addr = base + GUARD
        if content is not None:
            self.mem.write(addr, content)
        if writable:
            self.writable.append((addr, nbytes))
        return addr

    def header(self, type_, sector=0, writable=False):
        return self.buf(16, S.virtio_blk_req_hdr.pack(type_, 0, sector), writable=writable)

    def status(self):
        return self.buf(1, b"\xff", writable=True)

    def chain(self, descs, table=None, first=0):
        """Write ``descs`` = [(addr, len, flags[, next])] at consecutive indices from ``first`` of
        the queue's table (or into guest memory at ``table`` for an indirect table); NEXT links
        each to the following one unless a ``next`` is given. Returns the first index."""
        for i, d in enumerate(descs):
            addr, length, flags = d[:3]
            if len(d) > 3:
                nxt = d[3]
                flags |= S.VIRTQ_DESC_F_NEXT
            elif i < len(descs) - 1:
                nxt = first + i + 1
                flags |= S.VIRTQ_DESC_F_NEXT
            else:
                nxt = 0
            if table is None:
                self.dq.write_desc(first + i, addr, length, flags, nxt)
            else:
                S.virtq_desc.pack_into(
                    self.mem.view(table, 16 * len(descs)), 16 * i, addr, length, flags, nxt
                )
        return first

    def indirect_table(self, descs):
        """An indirect table in guest memory holding ``descs``; returns (addr, len)."""
        addr = self.alloc(16 * len(descs))
        self.chain(descs, table=addr)
        return addr, 16 * len(descs)

    def run(self, head):
        """Publish ``head``, notify, and return the used entries it produced plus the guest memory
        ranges that changed outside the used ring and the declared writable buffers."""
        self.dq.push_head(head)
        before = self.mem.read(0, self.mem.size)
        self.drv.notify(self.dq.index)
        used = self.dq.reap_raw()
        after = self.mem.read(0, self.mem.size)
        allowed = [(self.dq.used_addr, S.used_ring_bytes(self.dq.size)), *self.writable]
        self.writable = []
        return used, _changed_outside(before, after, allowed)


def _changed_outside(before, after, allowed):
    bad = []
    n = len(before)
    step = 4096
    for page in range(0, n, step):
        if before[page : page + step] == after[page : page + step]:
            continue
        for i in range(page, min(page + step, n)):
            if before[i] != after[i] and not any(a <= i < a + ln for a, ln in allowed):
                bad.append(i)
    return bad


class PackedGuest(Guest):
    """Raw access to a packed queue: chains are published at the driver's next ring positions."""

    def pchain(self, descs, buffer_id=0):
        """Publish ``descs`` = [(addr, len, flags)] with NEXT on all but the last (unless a
        4th element ``False`` says no NEXT); returns ``buffer_id``."""
        entries = []
        for i, d in enumerate(descs):
            addr, length, flags = d[:3]
            nxt = d[3] if len(d) > 3 else i < len(descs) - 1
            entries.append((addr, length, flags | (S.VIRTQ_DESC_F_NEXT if nxt else 0)))
        self.dq.publish_raw(entries, buffer_id)
        return buffer_id

    def run(self, buffer_id=None):
        """Notify (the chain is already published), and return the used entries and the memory
        changed outside the writable buffers and the ring (where used descriptors go)."""
        before = self.mem.read(0, self.mem.size)
        self.drv.notify(self.dq.index)
        after = self.mem.read(0, self.mem.size)
        used = self.dq.reap_raw()
        allowed = [
            (self.dq.desc_addr, S.packed_ring_bytes(self.dq.size)),
            (self.dq.used_addr, 4),
            *self.writable,
        ]
        self.writable = []
        return used, _changed_outside(before, after, allowed)

"""A fake vhost-user front-end for tests: what QEMU does, in Python.

``Frontend(sock)`` speaks the protocol over a connected socket (one end of a ``socketpair`` or a
connection to ``vblock serve``'s socket). Guest RAM is a memfd the front-end maps itself and hands
to the back-end by fd, as QEMU does with ``memory-backend-memfd,share=on`` (sealed against
growing and shrinking, as QEMU seals it by default). A tiny guest-side split ring
(``GuestRing``) lays out virtio-blk requests - header, data, status in three descriptors -
publishes them, kicks through an eventfd and reaps completions after the call
eventfd fires. Addresses given to the back-end are *front-end virtual* ones (``UVA_BASE`` + guest
physical), so the back-end must translate them through the regions as it would for QEMU.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import select
import socket
import struct

from vblock.vhost_user import protocol as P
from vblock.vhost_user.protocol import Req

RAM_BYTES = 8 << 20
UVA_BASE = 0x7F00_0000_0000  # where "QEMU" pretends guest RAM is mapped in its address space
WAIT = 30.0  # seconds: a lost completion fails the test instead of hanging it

F_VERSION_1 = 1 << 32
F_PROTOCOL = 1 << P.VHOST_USER_F_PROTOCOL_FEATURES
F_EVENT_IDX = 1 << 29
F_INDIRECT = 1 << 28
F_FLUSH = 1 << 9
F_MQ = 1 << 12
F_CONFIG_WCE = 1 << 11
SEABIOS_FEATURES = (
    F_VERSION_1 | F_PROTOCOL | 0x46
)  # SIZE_MAX, SEG_MAX, BLK_SIZE (reference: 0x140000046)
LINUX_FEATURES = (
    SEABIOS_FEATURES
    | F_EVENT_IDX
    | F_INDIRECT
    | F_FLUSH
    | F_CONFIG_WCE
    | (1 << 10)
    | (1 << 13)
    | (1 << 14)
)

T_IN, T_OUT, T_FLUSH = 0, 1, 4
DESC_F_NEXT, DESC_F_WRITE = 1, 2


def sealed_memfd(name, nbytes, seals=None):
    """A memfd of ``nbytes`` sealed as QEMU's ``memory-backend-memfd`` seals its RAM by default
    (grow, shrink, seal); ``seals`` overrides the set (0: unsealed, still sealable)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, nbytes)
    if seals is None:
        seals = fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


class Frontend:
    """``seals``: the guest RAM memfd's seals (default: QEMU's)."""

    def __init__(self, sock, seals=None):
        self.sock = sock
        self.memfd = sealed_memfd("guest-ram", RAM_BYTES, seals)
        self.ram = mmap.mmap(self.memfd, RAM_BYTES)
        self.protocol_features = 0
        self._next_alloc = 0x10000

    def close(self):
        self.sock.close()
        os.close(self.memfd)

    # -- messages ---------------------------------------------------------------------------------
    def send(self, code, value=None, fds=(), flags=P.VERSION, raw=None):
        payload = (
            raw if raw is not None else (P.encode_value(code, value) if value is not None else b"")
        )
        msg = P.encode(code, payload, flags)
        anc = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
            if fds
            else []
        )
        self.sock.sendmsg([msg], anc)

    def recv_reply(self, code):
        hdr = self._recv_exact(P.HEADER.size)
        rcode, flags, size = P.HEADER.unpack(hdr)
        payload = self._recv_exact(size)
        assert rcode == code, (rcode, code)
        assert flags == P.VERSION | P.FLAG_REPLY, hex(flags)
        return payload

    def _recv_exact(self, n):
        out = b""
        self.sock.settimeout(WAIT)
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("back-end closed the connection")
            out += chunk
        return out

    def get_u64(self, code):
        return P.u64.unpack(self.recv_after(code))[0]

    def recv_after(self, code, value=None, flags=P.VERSION):
        self.send(code, value, flags=flags)
        return self.recv_reply(code)

    def request(self, code, value=None, fds=()):
        """Send; with REPLY_ACK negotiated ask for an ack and return its status (0 = ok)."""
        if self.protocol_features >> P.PROTOCOL_F_REPLY_ACK & 1:
            self.send(code, value, fds, flags=P.VERSION | P.FLAG_NEED_REPLY)
            return P.u64.unpack(self.recv_reply(code))[0]
        self.send(code, value, fds)
        return None

    # -- the connect sequence (reference §4) --------------------------------------------------------
    def connect(self, protocol_features=None):
        feats = self.get_u64(Req.GET_FEATURES)
        pf = self.get_u64(Req.GET_PROTOCOL_FEATURES)
        want = pf if protocol_features is None else protocol_features & pf
        self.send(Req.SET_PROTOCOL_FEATURES, want)
        self.protocol_features = want
        queues = self.get_u64(Req.GET_QUEUE_NUM) if want & 1 << P.PROTOCOL_F_MQ else 1
        slots = (
            self.get_u64(Req.GET_MAX_MEM_SLOTS)
            if want >> P.PROTOCOL_F_CONFIGURE_MEM_SLOTS & 1
            else None
        )
        self.request(Req.SET_OWNER)
        assert self.get_u64(Req.GET_FEATURES) == feats
        return feats, pf, queues, slots

    def get_config(self, size=60):
        c = P.ConfigSpace(0, size, 0, bytes(size))
        payload = self.recv_after(Req.GET_CONFIG, c)
        _, rsize, _ = P.config_head.unpack_from(payload)
        return payload[P.config_head.size : P.config_head.size + rsize]

    def region(self):
        return P.MemRegion(0, RAM_BYTES, UVA_BASE, 0)

    def set_mem_table(self):
        return self.request(Req.SET_MEM_TABLE, (self.region(),), fds=(self.memfd,))

    def add_mem_reg(self, region=None):
        return self.request(Req.ADD_MEM_REG, region or self.region(), fds=(self.memfd,))

    def alloc(self, nbytes, align=4096):
        addr = (self._next_alloc + align - 1) & ~(align - 1)
        self._next_alloc = addr + nbytes
        assert self._next_alloc <= RAM_BYTES
        return addr

    def start_ring(self, index, features, size=16, base=0, ring=None, enable=True):
        """SET_FEATURES ... SET_VRING_ENABLE 1, as QEMU starts a ring. Returns its GuestRing."""
        self.request(Req.SET_FEATURES, features)
        ring = ring or GuestRing(self, index, size, bool(features & F_EVENT_IDX))
        self.request(Req.SET_VRING_CALL, index, fds=(ring.call,))
        self.request(Req.SET_VRING_NUM, (index, ring.size))
        self.request(Req.SET_VRING_BASE, (index, base))
        self.request(
            Req.SET_VRING_ADDR,
            P.VringAddr(
                index, 0, UVA_BASE + ring.desc, UVA_BASE + ring.used, UVA_BASE + ring.avail, 0
            ),
        )
        self.request(Req.SET_VRING_KICK, index, fds=(ring.kick,))
        if enable:
            self.request(Req.SET_VRING_ENABLE, (index, 1))
        return ring

    def stop_ring(self, index):
        """SET_VRING_ENABLE 0, GET_VRING_BASE: returns the back-end's next avail index."""
        self.request(Req.SET_VRING_ENABLE, (index, 0))
        payload = self.recv_after(Req.GET_VRING_BASE, (index, 0))
        i, base = P.vring_state.unpack(payload)
        assert i == index
        return base


class GuestRing:
    """The guest side of one split ring in the front-end's RAM (virtio 1.2, 2.7)."""

    def __init__(self, fe, index, size, event_idx):
        self.fe = fe
        self.index = index
        self.size = size
        self.event_idx = event_idx
        self.desc = fe.alloc(16 * size, 16)
        self.avail = fe.alloc(6 + 2 * size, 2)
        self.used = fe.alloc(6 + 8 * size, 4096)
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.avail_idx = 0
        self.last_used = 0
        self.bufs = [
            fe.alloc(4096 + 65536 + 64, 4096) for _ in range(size // 3)
        ]  # per head: hdr, data, status
        self.free = list(range(size // 3))
        self.pending = {}

    def _w(self, fmt, addr, *vals):
        struct.pack_into(fmt, self.fe.ram, addr, *vals)

    def _r(self, fmt, addr):
        return struct.unpack_from(fmt, self.fe.ram, addr)

    def submit(self, type_, sector, data=b"", length=0):
        """Queue one request (data for writes, ``length`` bytes for reads); returns its head."""
        head = self.free.pop(0)
        base = self.bufs[head]
        hdr, buf, status = base, base + 4096, base + 4096 + 65536  # data page-aligned, as a guest's
        self._w("<IIQ", hdr, type_, 0, sector)
        n = len(data) if type_ == T_OUT else length
        if type_ == T_OUT:
            self.fe.ram[buf : buf + n] = data
        self.fe.ram[status] = 0xFF
        return self._post(
            head,
            [(hdr, 16, 0)]
            + ([(buf, n, DESC_F_WRITE if type_ == T_IN else 0)] if n else [])
            + [(status, 1, DESC_F_WRITE)],
            type_,
            buf,
            n,
            status,
        )

    def _post(self, head, descs, type_, buf, n, status):
        # heads are 0 .. size/3 - 1; head h chains table entries h, h + size/3, h + 2 * size/3
        idxs = [head + self.size // 3 * k for k in range(len(descs))]
        for j, (addr, length, flags) in enumerate(descs):
            nxt = idxs[j + 1] if j + 1 < len(descs) else 0
            self._w(
                "<QIHH",
                self.desc + 16 * idxs[j],
                addr,
                length,
                flags | (DESC_F_NEXT if j + 1 < len(descs) else 0),
                nxt,
            )
        slot = self.avail_idx % self.size
        self._w("<H", self.avail + 4 + 2 * slot, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self._w("<H", self.avail + 2, self.avail_idx)  # publish (x86: stores are ordered)
        self.pending[head] = (type_, buf, n, status, idxs)
        return head

    def notify(self):
        os.eventfd_write(self.kick, 1)

    def wait(self, count=1):
        """Wait for ``count`` completions (call eventfd); returns {head: (status, used_len, data)}."""
        out = {}
        while len(out) < count:
            used_idx = self._r("<H", self.used + 2)[0]
            while self.last_used != used_idx:
                slot = self.last_used % self.size
                head, ln = self._r("<II", self.used + 4 + 8 * slot)
                type_, buf, n, status, idxs = self.pending.pop(head)
                data = bytes(self.fe.ram[buf : buf + n]) if type_ == T_IN else b""
                out[head] = (self.fe.ram[status], ln, data)
                self.free.append(head)
                self.last_used = (self.last_used + 1) & 0xFFFF
            if self.event_idx:
                self._w("<H", self.avail + 4 + 2 * self.size, self.last_used)  # used_event
            if len(out) >= count:
                break
            r, _, _ = select.select([self.call], [], [], WAIT)
            if not r:
                raise TimeoutError(f"no completion on ring {self.index} after {WAIT} s")
            os.eventfd_read(self.call)
        return out

    def run(self, type_, sector, data=b"", length=0):
        head = self.submit(type_, sector, data, length)
        self.notify()
        return self.wait(1)[head]

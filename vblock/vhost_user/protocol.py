"""The vhost-user protocol, sans I/O: the message codec and the session state table.

Theory of operation
-------------------
A vhost-user front-end (QEMU, Cloud Hypervisor, a test) talks to a back-end over a unix stream
socket. Every message is a 12-byte little-endian header ``(request u32, flags u32, size u32)``
followed by ``size`` payload bytes; file descriptors ride along as SCM_RIGHTS ancillary data on the
``sendmsg`` that carries the message. Requests flow front-end -> back-end; the back-end answers
with a message of the same request code and the REPLY flag, but only where the protocol asks for
one (a ``GET_*`` request, or any request flagged NEED_REPLY once REPLY_ACK is negotiated).

``Connection`` never sees a socket, exactly like h11: the server feeds it what ``recvmsg`` returned
(``receive_data(bytes, fds)``; ``b""`` means the peer closed), pulls typed requests with
``next_event()`` (a ``Request`` or the sentinels ``NEED_DATA`` / ``CLOSED``), acts on them, and
turns the outcome into the bytes to write with ``respond(request, value)`` /
``refuse(request)``. File descriptors are attached to the message whose bytes arrived with them.
A unix stream socket may glue the bytes of fd-less messages in front of a message that carries
fds into one ``recvmsg``, but never reads past the message that carries them (the kernel stops a
read after an skb with SCM_RIGHTS). So each batch of fds is remembered with the stream position
where its chunk *ends*, and belongs to the first message that reaches that position: the last
message that begins in the chunk.
Every fd reaches exactly one owner: a request that carries fds by definition (``_TAKES_FDS``)
hands them to the caller in ``Request.fds``; fds attached to any other known request are closed
here and the request comes out with none (a front-end cannot make the back-end hold fds by
attaching them to GET_FEATURES); fds that belong to no message yet are ``pending_fds()``.

The session state - what was negotiated and the state of every ring - lives in ``Session`` and
changes only through the transition table ``_RING_TRANSITIONS`` (ring state x request -> ring
state). A ring is STOPPED until it gets a kick fd (SET_VRING_KICK starts it) and stops again at
GET_VRING_BASE; its ring addresses and base may change only while it is stopped. Whether a started
ring may be *processed* also depends on enabling: with VHOST_USER_F_PROTOCOL_FEATURES negotiated,
rings start disabled and wait for SET_VRING_ENABLE 1; without it they run as soon as they start.
``Ring.runnable`` says which; the back-end starts and stops queue processing on its changes.

Errors say who broke the rules, as in h11: ``LocalProtocolError`` for the caller of this module,
``RemoteProtocolError`` for the front-end. Any malformed message (bad version, a size that does
not fit the request, a ring index out of range, an illegal ring transition) raises
``RemoteProtocolError`` from ``next_event`` after which the connection is in ``ERROR`` and the
server drops it. A request the back-end does not implement is not an error: it comes out as a
``Request`` with ``known=False`` and the back-end ``refuse``s it (a failed ack when the front-end
asked for one, nothing otherwise), as the protocol says.
"""

from __future__ import annotations

import dataclasses
import enum
import struct

__all__ = [
    "NEED_DATA",
    "CLOSED",
    "Connection",
    "Request",
    "Ring",
    "RingState",
    "Session",
    "MemRegion",
    "VringAddr",
    "ConfigSpace",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Req",
    "encode",
]

# -- wire constants -------------------------------------------------------------------------------
HEADER = struct.Struct("<III")  # request, flags, size
VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
MAX_PAYLOAD = 4096  # the largest payload a defined request carries (mem table: 8 + 8 * 32)
MAX_FDS = 32
VRING_IDX_MASK = 0xFF  # SET_VRING_KICK/CALL/ERR: u64 payload, ring index in bits 0..7
VRING_NOFD_MASK = 0x100  # ... and bit 8 set: no fd attached (polling / no notification)
MEMORY_MAX_NREGIONS = 8  # SET_MEM_TABLE's fixed array
CONFIG_SPACE_MAX = 256

u64 = struct.Struct("<Q")
vring_state = struct.Struct("<II")  # index, num
vring_addr = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (user addresses)
mem_region = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
mem_table_head = struct.Struct("<II")  # nregions, padding
config_head = struct.Struct("<III")  # offset, size, flags


class Req(enum.IntEnum):
    """Front-end request codes (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


# Protocol feature bits (GET/SET_PROTOCOL_FEATURES)
PROTOCOL_F_MQ = 0
PROTOCOL_F_LOG_SHMFD = 1
PROTOCOL_F_REPLY_ACK = 3
PROTOCOL_F_BACKEND_REQ = 5
PROTOCOL_F_CONFIG = 9
PROTOCOL_F_CONFIGURE_MEM_SLOTS = 15

# Virtio feature bits that belong to vhost-user itself, not to the device
VHOST_F_LOG_ALL = 26
VHOST_USER_F_PROTOCOL_FEATURES = 30

# The known requests that carry fds (how many is checked by ``Session.apply`` where it matters);
# fds on any other known request are closed by the connection.
_TAKES_FDS = {
    Req.SET_MEM_TABLE,
    Req.ADD_MEM_REG,
    Req.REM_MEM_REG,  # QEMU attaches the region's fd; the back-end closes it
    Req.SET_VRING_KICK,
    Req.SET_VRING_CALL,
    Req.SET_VRING_ERR,
    Req.SET_BACKEND_REQ_FD,
}

# The requests whose reply is part of the request itself (not a REPLY_ACK).
_REPLIES = {
    Req.GET_FEATURES,
    Req.GET_PROTOCOL_FEATURES,
    Req.GET_QUEUE_NUM,
    Req.GET_VRING_BASE,
    Req.GET_CONFIG,
    Req.GET_MAX_MEM_SLOTS,
}


# -- sentinels and errors -------------------------------------------------------------------------
class _Sentinel(type):
    def __repr__(cls):
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):
    """``next_event``: no whole message buffered yet; feed more bytes."""


class CLOSED(metaclass=_Sentinel):
    """``next_event``: the peer closed the connection (after every whole message was read)."""


class ERROR(metaclass=_Sentinel):
    """Connection state after a protocol error: nothing more is parsed."""


class ProtocolError(Exception):
    """Base of the two kinds below; never raised itself."""

    def __init__(self, msg):
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """The caller of this module did something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The front-end sent something the protocol forbids."""


# -- payload values -------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MemRegion:
    """One region of guest memory: ``size`` bytes at guest-physical ``gpa``, mapped by the front-end
    at its virtual ``uva``, found at ``mmap_offset`` in the region's fd."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int

    def uva_to_gpa(self, addr, length=1):
        """The guest-physical address of front-end virtual ``addr`` or None if outside."""
        if self.uva <= addr and addr + length <= self.uva + self.size:
            return addr - self.uva + self.gpa
        return None


@dataclasses.dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR: ring addresses in the *front-end's* virtual address space."""

    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclasses.dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG / SET_CONFIG: ``size`` bytes of device config at ``offset``."""

    offset: int
    size: int
    flags: int
    data: bytes


@dataclasses.dataclass(frozen=True)
class Request:
    """One decoded front-end message.

    ``code`` is the request number (a ``Req`` when known), ``flags`` the header flags, ``value`` the
    decoded payload (an int, ``(index, num)``, ``VringAddr``, a tuple of ``MemRegion``, a
    ``MemRegion``, ``ConfigSpace`` or raw bytes for requests this module does not decode), ``fds`` the
    file descriptors that came with it (the receiver owns and must close them), and ``known`` False
    for request codes this back-end does not implement.
    """

    code: int
    flags: int
    value: object
    fds: tuple = ()
    known: bool = True

    @property
    def need_reply(self):
        return bool(self.flags & FLAG_NEED_REPLY)


# -- payload codecs -------------------------------------------------------------------------------
def _exact(st):
    def dec(code, payload):
        if len(payload) != st.size:
            raise RemoteProtocolError(
                f"{_name(code)}: payload of {len(payload)} bytes, expected {st.size}"
            )
        vals = st.unpack(payload)
        return vals[0] if len(vals) == 1 else vals

    return dec


def _none(code, payload):
    return None  # payload ignored (SET_OWNER carries none; some front-ends send a u64 0)


def _dec_vring_addr(code, payload):
    if len(payload) != vring_addr.size:
        raise RemoteProtocolError(
            f"{_name(code)}: payload of {len(payload)} bytes, expected {vring_addr.size}"
        )
    return VringAddr(*vring_addr.unpack(payload))


def _dec_mem_table(code, payload):
    if len(payload) < mem_table_head.size:
        raise RemoteProtocolError(
            f"SET_MEM_TABLE: payload of {len(payload)} bytes has no region count"
        )
    n, _pad = mem_table_head.unpack_from(payload)
    if n > MEMORY_MAX_NREGIONS:
        raise RemoteProtocolError(f"SET_MEM_TABLE: {n} regions, at most {MEMORY_MAX_NREGIONS}")
    need = mem_table_head.size + n * mem_region.size
    if len(payload) < need:
        raise RemoteProtocolError(
            f"SET_MEM_TABLE: {n} regions need {need} bytes, got {len(payload)}"
        )
    return tuple(
        MemRegion(*mem_region.unpack_from(payload, mem_table_head.size + i * mem_region.size))
        for i in range(n)
    )


def _dec_mem_reg(code, payload):
    if len(payload) != 8 + mem_region.size:
        raise RemoteProtocolError(
            f"{_name(code)}: payload of {len(payload)} bytes, expected {8 + mem_region.size}"
        )
    return MemRegion(*mem_region.unpack_from(payload, 8))


def _dec_config(code, payload):
    if len(payload) < config_head.size:
        raise RemoteProtocolError(
            f"{_name(code)}: payload of {len(payload)} bytes has no config header"
        )
    offset, size, flags = config_head.unpack_from(payload)
    if size > CONFIG_SPACE_MAX or len(payload) < config_head.size + size:
        raise RemoteProtocolError(f"{_name(code)}: config size {size} does not fit the payload")
    return ConfigSpace(
        offset, size, flags, bytes(payload[config_head.size : config_head.size + size])
    )


_DECODERS = {
    Req.GET_FEATURES: _none,
    Req.SET_FEATURES: _exact(u64),
    Req.SET_OWNER: _none,
    Req.RESET_OWNER: _none,
    Req.SET_MEM_TABLE: _dec_mem_table,
    Req.SET_VRING_NUM: _exact(vring_state),
    Req.SET_VRING_ADDR: _dec_vring_addr,
    Req.SET_VRING_BASE: _exact(vring_state),
    Req.GET_VRING_BASE: _exact(vring_state),
    Req.SET_VRING_KICK: _exact(u64),
    Req.SET_VRING_CALL: _exact(u64),
    Req.SET_VRING_ERR: _exact(u64),
    Req.GET_PROTOCOL_FEATURES: _none,
    Req.SET_PROTOCOL_FEATURES: _exact(u64),
    Req.GET_QUEUE_NUM: _none,
    Req.SET_VRING_ENABLE: _exact(vring_state),
    Req.SET_BACKEND_REQ_FD: _none,
    Req.GET_CONFIG: _dec_config,
    Req.SET_CONFIG: _dec_config,
    Req.GET_MAX_MEM_SLOTS: _none,
    Req.ADD_MEM_REG: _dec_mem_reg,
    Req.REM_MEM_REG: _dec_mem_reg,
    Req.RESET_DEVICE: _none,
}


def _name(code):
    try:
        return Req(code).name
    except ValueError:
        return f"request {code}"


def encode(code, payload=b"", flags=VERSION):
    """A whole message: header + payload (used for replies, and by test front-ends for requests)."""
    return HEADER.pack(int(code), flags, len(payload)) + payload


def encode_value(code, value):
    """The payload bytes of ``value`` for ``code`` (the inverse of the decoders)."""
    code = Req(code)
    if code in (
        Req.GET_FEATURES,
        Req.SET_FEATURES,
        Req.GET_PROTOCOL_FEATURES,
        Req.SET_PROTOCOL_FEATURES,
        Req.GET_QUEUE_NUM,
        Req.GET_MAX_MEM_SLOTS,
        Req.SET_VRING_KICK,
        Req.SET_VRING_CALL,
        Req.SET_VRING_ERR,
    ):
        return u64.pack(value)
    if code in (Req.SET_VRING_NUM, Req.SET_VRING_BASE, Req.GET_VRING_BASE, Req.SET_VRING_ENABLE):
        return vring_state.pack(*value)
    if code == Req.SET_VRING_ADDR:
        v = value
        return vring_addr.pack(v.index, v.flags, v.desc, v.used, v.avail, v.log)
    if code == Req.SET_MEM_TABLE:
        out = mem_table_head.pack(len(value), 0)
        for r in value:
            out += mem_region.pack(r.gpa, r.size, r.uva, r.mmap_offset)
        return out
    if code in (Req.ADD_MEM_REG, Req.REM_MEM_REG):
        return u64.pack(0) + mem_region.pack(value.gpa, value.size, value.uva, value.mmap_offset)
    if code in (Req.GET_CONFIG, Req.SET_CONFIG):
        return config_head.pack(value.offset, value.size, value.flags) + value.data
    if value is None:
        return b""
    raise LocalProtocolError(f"no encoder for {code.name}")


# -- the session ----------------------------------------------------------------------------------
class RingState(enum.Enum):
    STOPPED = "stopped"
    STARTED = "started"


# (ring state, request) -> next ring state; a pair missing from the table is a protocol error.
_RING_TRANSITIONS = {
    (RingState.STOPPED, Req.SET_VRING_NUM): RingState.STOPPED,
    (RingState.STOPPED, Req.SET_VRING_BASE): RingState.STOPPED,
    (RingState.STOPPED, Req.SET_VRING_ADDR): RingState.STOPPED,
    (RingState.STARTED, Req.SET_VRING_ADDR): RingState.STARTED,  # log address changes (migration)
    (RingState.STOPPED, Req.SET_VRING_KICK): RingState.STARTED,
    (RingState.STARTED, Req.SET_VRING_KICK): RingState.STARTED,  # a new kick fd for a running ring
    (RingState.STOPPED, Req.GET_VRING_BASE): RingState.STOPPED,
    (RingState.STARTED, Req.GET_VRING_BASE): RingState.STOPPED,
    (RingState.STOPPED, Req.SET_VRING_CALL): RingState.STOPPED,
    (RingState.STARTED, Req.SET_VRING_CALL): RingState.STARTED,
    (RingState.STOPPED, Req.SET_VRING_ERR): RingState.STOPPED,
    (RingState.STARTED, Req.SET_VRING_ERR): RingState.STARTED,
    (RingState.STOPPED, Req.SET_VRING_ENABLE): RingState.STOPPED,
    (RingState.STARTED, Req.SET_VRING_ENABLE): RingState.STARTED,
}


@dataclasses.dataclass
class Ring:
    """What the front-end told us about one ring. ``base`` is the next avail index to process
    (SET_VRING_BASE); the back-end reads it back for GET_VRING_BASE."""

    index: int
    state: RingState = RingState.STOPPED
    num: int = 0
    base: int = 0
    addr: VringAddr | None = None
    enabled: bool = False
    has_kick: bool = False
    protocol_features: bool = False  # mirrors the session's F_PROTOCOL_FEATURES

    @property
    def runnable(self):
        """Started and enabled (rings start enabled when F_PROTOCOL_FEATURES is not negotiated)."""
        return self.state is RingState.STARTED and (self.enabled or not self.protocol_features)


class Session:
    """Negotiated state and ring states of one connection, changed only by :meth:`apply`."""

    def __init__(self, num_queues, device_features, protocol_features):
        self.num_queues = num_queues
        self.device_features = device_features | 1 << VHOST_USER_F_PROTOCOL_FEATURES
        self.offered_protocol_features = protocol_features
        self.protocol_features = 0  # acked by SET_PROTOCOL_FEATURES
        self.features = 0  # acked by SET_FEATURES (virtio + vhost bits)
        self.features_set = False
        self.owner = False
        self.rings = [Ring(i) for i in range(num_queues)]

    def has_protocol(self, bit):
        return bool(self.protocol_features >> bit & 1)

    def ring(self, code, index):
        if not 0 <= index < self.num_queues:
            raise RemoteProtocolError(
                f"{_name(code)}: ring {index} out of 0..{self.num_queues - 1}"
            )
        return self.rings[index]

    def apply(self, req):
        """Check ``req`` against the state table and record what it says. Raises
        ``RemoteProtocolError`` for an illegal request (the session is then unchanged)."""
        code = req.code
        v = req.value
        if code == Req.SET_FEATURES:
            if v & ~self.device_features:
                raise RemoteProtocolError(
                    f"SET_FEATURES {v:#x} has bits never offered ({self.device_features:#x})"
                )
            self.features = v
            self.features_set = True
            pf = bool(v >> VHOST_USER_F_PROTOCOL_FEATURES & 1)
            for r in self.rings:
                r.protocol_features = pf
        elif code == Req.SET_PROTOCOL_FEATURES:
            if v & ~self.offered_protocol_features:
                raise RemoteProtocolError(f"SET_PROTOCOL_FEATURES {v:#x} has bits never offered")
            self.protocol_features = v
        elif code == Req.SET_OWNER:
            self.owner = True
        elif code == Req.RESET_OWNER:
            self.owner = False
        elif code in (
            Req.SET_VRING_NUM,
            Req.SET_VRING_BASE,
            Req.GET_VRING_BASE,
            Req.SET_VRING_ENABLE,
        ):
            index, num = v
            r = self.ring(code, index)
            nxt = self._step(r, code)
            if code == Req.SET_VRING_NUM:
                if num == 0 or num & (num - 1) or num > 32768:
                    raise RemoteProtocolError(
                        f"SET_VRING_NUM: ring {index} size {num} is not a power of 2 <= 32768"
                    )
                r.num = num
            elif code == Req.SET_VRING_BASE:
                if num > 0xFFFF:
                    raise RemoteProtocolError(
                        f"SET_VRING_BASE: ring {index} base {num} does not fit 16 bits"
                    )
                r.base = num
            elif code == Req.SET_VRING_ENABLE:
                if num not in (0, 1):
                    raise RemoteProtocolError(
                        f"SET_VRING_ENABLE: ring {index} value {num} is not 0 or 1"
                    )
                r.enabled = bool(num)
            else:  # GET_VRING_BASE stops the ring; the back-end fills r.base before replying
                r.has_kick = False
            r.state = nxt
        elif code == Req.SET_VRING_ADDR:
            r = self.ring(code, v.index)
            r.state = self._step(r, code)
            r.addr = v
        elif code in (Req.SET_VRING_KICK, Req.SET_VRING_CALL, Req.SET_VRING_ERR):
            index = v & VRING_IDX_MASK
            nofd = bool(v & VRING_NOFD_MASK)
            if v & ~(VRING_IDX_MASK | VRING_NOFD_MASK):
                raise RemoteProtocolError(f"{_name(code)}: reserved bits set in {v:#x}")
            if nofd and req.fds:
                raise RemoteProtocolError(
                    f"{_name(code)}: NOFD flag with {len(req.fds)} fds attached"
                )
            if not nofd and len(req.fds) != 1:
                raise RemoteProtocolError(f"{_name(code)}: expected 1 fd, got {len(req.fds)}")
            r = self.ring(code, index)
            nxt = self._step(r, code)
            if code == Req.SET_VRING_KICK:
                r.has_kick = not nofd
            r.state = nxt
        elif code == Req.SET_MEM_TABLE:
            if len(req.fds) != len(v):
                raise RemoteProtocolError(f"SET_MEM_TABLE: {len(v)} regions but {len(req.fds)} fds")
        elif code == Req.ADD_MEM_REG:
            if len(req.fds) != 1:
                raise RemoteProtocolError(f"ADD_MEM_REG: expected 1 fd, got {len(req.fds)}")

    @staticmethod
    def _step(ring, code):
        try:
            return _RING_TRANSITIONS[(ring.state, code)]
        except KeyError:
            raise RemoteProtocolError(
                f"{_name(code)} on ring {ring.index} while {ring.state.value}"
            ) from None


# -- the connection -------------------------------------------------------------------------------
class Connection:
    """Bytes and fds in, ``Request`` events out; replies out as bytes.

    ``Connection(num_queues, device_features, protocol_features)``: the back-end's offer. The
    connection answers nothing by itself: the caller decides the value of every ``GET_*`` and
    passes it to :meth:`respond`.
    """

    def __init__(self, num_queues=1, device_features=0, protocol_features=0):
        self.session = Session(num_queues, device_features, protocol_features)
        self._buf = bytearray()
        self._pos = 0  # stream position of _buf[0]
        self._fd_marks = []  # [(stream position where the chunk that brought them ends, [fds])]
        self._eof = False
        self.state = None  # None while open, ERROR after a protocol error

    # -- input ----------------------------------------------------------------------------------
    def receive_data(self, data, fds=()):
        """Feed what ``recvmsg`` returned. ``b""`` means end of stream."""
        if self._eof and data:
            raise LocalProtocolError("data received after end of stream")
        if fds:
            self._fd_marks.append((self._pos + len(self._buf) + len(data), list(fds)))
        if not data:
            if not fds:
                self._eof = True
            return
        self._buf += data

    def pending_fds(self):
        """Fds received but not yet attached to a message (the caller closes them on teardown)."""
        return [fd for _, fds in self._fd_marks for fd in fds]

    @property
    def partial(self):
        """True while part of a message is buffered (the caller times out a front-end that stops
        half-way through one)."""
        return bool(self._buf)

    @property
    def position(self):
        """The stream position of the first byte not yet consumed by a whole message."""
        return self._pos

    def next_event(self):
        """The next ``Request``, or ``NEED_DATA``, or ``CLOSED``. Raises ``RemoteProtocolError``
        (and moves to ERROR) on a malformed or illegal message."""
        if self.state is ERROR:
            raise LocalProtocolError("connection is in ERROR after a protocol error")
        try:
            return self._next()
        except RemoteProtocolError:
            self.state = ERROR
            raise

    def _next(self):
        buf = self._buf
        if len(buf) < HEADER.size:
            if self._eof:
                if buf:
                    raise RemoteProtocolError(
                        f"connection closed inside a message header ({len(buf)} bytes)"
                    )
                return CLOSED
            return NEED_DATA
        code, flags, size = HEADER.unpack_from(buf)
        if flags & VERSION_MASK != VERSION:
            raise RemoteProtocolError(
                f"{_name(code)}: protocol version {flags & VERSION_MASK}, expected {VERSION}"
            )
        if flags & FLAG_REPLY:
            raise RemoteProtocolError(f"{_name(code)}: a reply where a request was expected")
        if size > MAX_PAYLOAD:
            raise RemoteProtocolError(
                f"{_name(code)}: payload of {size} bytes (at most {MAX_PAYLOAD})"
            )
        total = HEADER.size + size
        if len(buf) < total:
            if self._eof:
                raise RemoteProtocolError(f"{_name(code)}: connection closed inside the payload")
            return NEED_DATA
        payload = bytes(buf[HEADER.size : total])
        del buf[:total]
        end = self._pos + total
        self._pos = end
        fds = []
        while self._fd_marks and self._fd_marks[0][0] <= end:
            fds.extend(self._fd_marks.pop(0)[1])
        if len(fds) > MAX_FDS:
            _close_all(fds)
            raise RemoteProtocolError(f"{_name(code)}: {len(fds)} fds attached (at most {MAX_FDS})")
        dec = _DECODERS.get(code)
        if dec is None:
            return Request(code, flags, payload, tuple(fds), known=False)
        code = Req(code)
        if fds and code not in _TAKES_FDS:
            _close_all(fds)  # the request takes none: nothing may keep them
            fds = []
        try:
            value = dec(code, payload)
            req = Request(code, flags, value, tuple(fds))
            self.session.apply(req)
        except RemoteProtocolError:
            _close_all(fds)
            raise
        return req

    # -- output ---------------------------------------------------------------------------------
    def _reply(self, req, payload):
        return encode(req.code, payload, VERSION | FLAG_REPLY)

    def respond(self, req, value=None):
        """The bytes answering ``req`` after the back-end handled it successfully (``b""`` when the
        protocol wants no answer). ``value``: what a ``GET_*`` request returns (an int, a
        ``(index, num)`` pair for GET_VRING_BASE, a ``ConfigSpace`` for GET_CONFIG)."""
        code = req.code
        if code in _REPLIES:
            if value is None:
                raise LocalProtocolError(f"{_name(code)} needs a value to reply with")
            if code == Req.GET_VRING_BASE:
                self.session.rings[value[0]].base = value[1]
            return self._reply(req, encode_value(code, value))
        return self._ack(req, 0)

    def refuse(self, req):
        """The bytes telling the front-end ``req`` failed: a failed ack if it asked for one, else
        nothing. ``GET_*`` requests that cannot be answered get an empty reply (front-ends treat a
        size mismatch as failure)."""
        if req.code in _REPLIES:
            return self._reply(req, b"")
        return self._ack(req, 1)

    def _ack(self, req, status):
        if req.need_reply and self.session.has_protocol(PROTOCOL_F_REPLY_ACK):
            return self._reply(req, u64.pack(status))
        return b""


def _close_all(fds):
    import os

    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

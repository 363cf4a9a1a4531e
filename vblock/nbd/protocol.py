"""The NBD protocol, sans I/O: the wire codec and the two sides' state machines.

Theory of operation
-------------------
An NBD session has two phases (``doc/proto.md`` of the NetworkBlockDevice project). In the
*handshake* the server greets (``NBDMAGIC``, ``IHAVEOPT``, handshake flags), the client answers
with its flags and then sends options one at a time, each answered by zero or more non-final
replies and one final reply (ACK or an error). ``NBD_OPT_GO`` (or the legacy ``EXPORT_NAME``)
ends the haggling; in the *transmission* phase the client sends 28-byte requests (WRITE carries
its payload) and the server answers each with a 16-byte simple reply or, once
``STRUCTURED_REPLY`` was negotiated, with chunks whose last one carries the DONE flag. Requests
are identified by an opaque 64-bit cookie; many may be in flight and replies come in any order.
All integers are big-endian; this module is the only place that packs or unpacks them.

``ServerConnection`` and ``ClientConnection`` never see a socket, exactly like h11: the caller
feeds received bytes with ``receive_data`` (``b""`` when the peer closed), pulls events with
``next_event()`` (an event object or the sentinels ``NEED_DATA`` / ``CLOSED``), and writes what
``data_to_send()`` returns plus whatever the reply and request methods return (lists of buffers,
so payloads go out without a copy).

The server side answers the whole handshake itself from the exports it was given; the caller
sees one ``Ready`` event when transmission starts, then ``Command`` events. A command the
protocol frames correctly but that cannot be served (unknown type, bad flags, out of range,
read-only, too large) comes out with ``error`` set to the NBD errno to answer with: the caller
replies with it and the connection lives. A WRITE too large to buffer is answered with EINVAL
and then the connection closes (``Command.fatal``), as the payload is never read. Framing that
cannot be trusted (bad magic, a handshake option that breaks the rules the spec says MUST be
dropped) raises ``RemoteProtocolError`` and the connection is in ``ERROR``: drop it.

The client side drives the handshake itself too (structured replies, ``base:allocation``, GO
with a BLOCK_SIZE request) and reports ``Ready`` or ``Refused``. Reads name the buffer the data
goes to; chunks are checked (inside the request, known cookie) and copied there, holes zeroed,
and one ``Reply`` event comes out per request when it is done.

The phases of each side and their legal moves are the tables ``SERVER_TRANSITIONS`` and
``CLIENT_TRANSITIONS``; ``_move`` is the only place a state changes, and an illegal move raises
``LocalProtocolError`` naming the role, state and event.
"""

from __future__ import annotations

import dataclasses
import enum
import errno as _errno
import struct

__all__ = [
    "NEED_DATA",
    "CLOSED",
    "State",
    "ServerConnection",
    "ClientConnection",
    "Export",
    "Ready",
    "Refused",
    "Command",
    "Disconnect",
    "Reply",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "Cmd",
    "Opt",
    "nbd_errno",
    "host_errno",
]

# -- wire constants (doc/proto.md names) ----------------------------------------------------------
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1 << 0  # handshake flags (server) and client flags share these two bits
FLAG_NO_ZEROES = 1 << 1
CLIENT_FLAGS_KNOWN = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES


class Opt(enum.IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR = 1 << 31
ERR_UNSUP = REP_ERR | 1
ERR_POLICY = REP_ERR | 2
ERR_INVALID = REP_ERR | 3
ERR_PLATFORM = REP_ERR | 4
ERR_TLS_REQD = REP_ERR | 5
ERR_UNKNOWN = REP_ERR | 6
ERR_SHUTDOWN = REP_ERR | 7
ERR_BLOCK_SIZE_REQD = REP_ERR | 8
ERR_TOO_BIG = REP_ERR | 9

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_FUA = 1 << 3
TF_ROTATIONAL = 1 << 4
TF_SEND_TRIM = 1 << 5
TF_SEND_WRITE_ZEROES = 1 << 6
TF_SEND_DF = 1 << 7
TF_CAN_MULTI_CONN = 1 << 8
TF_SEND_CACHE = 1 << 10
TF_SEND_FAST_ZERO = 1 << 11


class Cmd(enum.IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


CMD_FLAG_FUA = 1 << 0
CMD_FLAG_NO_HOLE = 1 << 1
CMD_FLAG_DF = 1 << 2
CMD_FLAG_REQ_ONE = 1 << 3
CMD_FLAG_FAST_ZERO = 1 << 4

# the flags each command may carry (FUA is valid on every command once SEND_FUA is advertised)
_VALID_FLAGS = {
    Cmd.READ: CMD_FLAG_FUA | CMD_FLAG_DF,
    Cmd.WRITE: CMD_FLAG_FUA,
    Cmd.DISC: CMD_FLAG_FUA,
    Cmd.FLUSH: CMD_FLAG_FUA,
    Cmd.TRIM: CMD_FLAG_FUA,
    Cmd.CACHE: CMD_FLAG_FUA,
    Cmd.WRITE_ZEROES: CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
    Cmd.BLOCK_STATUS: CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
}

# READ and WRITE with only FUA: the requests the hot path admits without _check (the flags each
# may not carry are the values)
_PLAIN = {0: ~CMD_FLAG_FUA & 0xFFFF, 1: ~CMD_FLAG_FUA & 0xFFFF}
_CMDS = {c.value: c for c in Cmd}

CHUNK_DONE = 1 << 0
CHUNK_NONE = 0
CHUNK_OFFSET_DATA = 1
CHUNK_OFFSET_HOLE = 2
CHUNK_BLOCK_STATUS = 5
CHUNK_ERROR = (1 << 15) | 1
CHUNK_ERROR_OFFSET = (1 << 15) | 2

STATE_HOLE = 1 << 0  # base:allocation extent flags
STATE_ZERO = 1 << 1
BASE_ALLOCATION = "base:allocation"

# NBD error values are Linux errno numbers, but protocol constants: mapped explicitly.
NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL = 1, 5, 12, 22
NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 28, 75, 95, 108
_TO_HOST = {
    NBD_EPERM: _errno.EPERM,
    NBD_EIO: _errno.EIO,
    NBD_ENOMEM: _errno.ENOMEM,
    NBD_EINVAL: _errno.EINVAL,
    NBD_ENOSPC: _errno.ENOSPC,
    NBD_EOVERFLOW: _errno.EOVERFLOW,
    NBD_ENOTSUP: _errno.ENOTSUP,
    NBD_ESHUTDOWN: _errno.ESHUTDOWN,
}
_TO_NBD = {v: k for k, v in _TO_HOST.items()}
_TO_NBD.update(
    {
        _errno.EROFS: NBD_EPERM,
        _errno.EDQUOT: NBD_ENOSPC,
        _errno.EFBIG: NBD_ENOSPC,
        _errno.EOPNOTSUPP: NBD_ENOTSUP,
    }
)

# limits
MAX_STRING = 4096  # names and descriptions (the spec's MUST)
MAX_OPTION_LENGTH = 1 << 20  # larger handshake options are hostile: the connection is dropped
MAX_PAYLOAD = 32 << 20  # READ and WRITE lengths this server accepts (QEMU's NBD_MAX_BUFFER_SIZE)
MAX_EXTENTS = 1 << 20  # extents per BLOCK_STATUS chunk (the spec's SHOULD)

_greeting = struct.Struct(">QQH")
_u16 = struct.Struct(">H")
_u32 = struct.Struct(">I")
_u64 = struct.Struct(">Q")
_option = struct.Struct(">QII")  # magic, option, length
_option_reply = struct.Struct(">QIII")  # magic, option, type, length
_export_name_reply = struct.Struct(">QH")  # size, transmission flags
_info_export = struct.Struct(">HQH")  # INFO_EXPORT, size, transmission flags
_info_block_size = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, minimum, preferred, maximum
_request = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
_request_unpack = _request.unpack
_simple_reply = struct.Struct(">IIQ")  # magic, error, cookie
_chunk = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
_extent = struct.Struct(">II")  # length, flags


def nbd_errno(host_err) -> int:
    """The NBD error value for a host errno (anything without a meaning of its own is EINVAL)."""
    return _TO_NBD.get(host_err, NBD_EINVAL)


def host_errno(nbd_err: int) -> int:
    """The host errno an NBD error value means (unknown values read as EINVAL, as the spec says)."""
    return _TO_HOST.get(nbd_err, _errno.EINVAL)


# -- sentinels, errors, states ---------------------------------------------------------------------
class _Sentinel(type):
    def __repr__(cls):
        return cls.__name__


class NEED_DATA(metaclass=_Sentinel):
    """``next_event``: nothing whole is buffered; feed more bytes."""


class CLOSED(metaclass=_Sentinel):
    """``next_event``: the session is over (the peer closed, aborted or disconnected); close."""


class ProtocolError(Exception):
    """Base of the two kinds below; never raised itself."""

    def __init__(self, msg):
        if type(self) is ProtocolError:
            raise TypeError("raise LocalProtocolError or RemoteProtocolError")
        super().__init__(msg)


class LocalProtocolError(ProtocolError):
    """The caller of this module did something the protocol forbids."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids; the connection must be dropped."""


class State(enum.Enum):
    """The phases of a session; the same names serve both roles."""

    GREETING = "greeting"  # server: waiting for client flags; client: waiting for the greeting
    OPTIONS = "options"  # haggling
    TRANSMISSION = "transmission"
    DISCONNECTING = "disconnecting"  # server: DISC received, replies still owed
    CLOSED = "closed"
    ERROR = "error"


# Event-triggered transitions per role: state -> {event name: next state}. Every other
# (state, event) pair is illegal. "peer_closed" is the peer's EOF, "violation" a
# RemoteProtocolError.
SERVER_TRANSITIONS = {
    State.GREETING: {
        "client_flags": State.OPTIONS,
        "peer_closed": State.CLOSED,
        "violation": State.ERROR,
    },
    State.OPTIONS: {
        "option": State.OPTIONS,
        "go": State.TRANSMISSION,
        "abort": State.CLOSED,
        "peer_closed": State.CLOSED,
        "violation": State.ERROR,
    },
    State.TRANSMISSION: {
        "request": State.TRANSMISSION,
        "disc": State.DISCONNECTING,
        "fatal_request": State.ERROR,
        "peer_closed": State.CLOSED,
        "violation": State.ERROR,
    },
    State.DISCONNECTING: {"peer_closed": State.DISCONNECTING},
    State.CLOSED: {},
    State.ERROR: {},
}
CLIENT_TRANSITIONS = {
    State.GREETING: {
        "greeting": State.OPTIONS,
        "peer_closed": State.CLOSED,
        "violation": State.ERROR,
    },
    State.OPTIONS: {
        "option": State.OPTIONS,
        "go": State.TRANSMISSION,
        "refused": State.CLOSED,
        "peer_closed": State.CLOSED,
        "violation": State.ERROR,
    },
    State.TRANSMISSION: {
        "reply": State.TRANSMISSION,
        "disc": State.DISCONNECTING,
        "peer_closed": State.CLOSED,
        "violation": State.ERROR,
    },
    State.DISCONNECTING: {
        "reply": State.DISCONNECTING,
        "peer_closed": State.CLOSED,
        "violation": State.ERROR,
    },
    State.CLOSED: {},
    State.ERROR: {},
}


# -- events ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Export:
    """What a server offers under one name. Sizes in bytes; ``min_block``/``pref_block``/
    ``max_payload`` are the BLOCK_SIZE info (minimum, preferred, maximum payload)."""

    name: str
    size: int
    read_only: bool = False
    multi_conn: bool = False
    description: str = ""
    min_block: int = 1
    pref_block: int = 4096
    max_payload: int = MAX_PAYLOAD
    can_trim: bool = True
    can_zero: bool = True

    def transmission_flags(self, structured: bool) -> int:
        f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE
        if self.read_only:
            f |= TF_READ_ONLY
        else:
            if self.can_trim:
                f |= TF_SEND_TRIM
            if self.can_zero:
                f |= TF_SEND_WRITE_ZEROES
        if structured:
            f |= TF_SEND_DF
        if self.multi_conn:
            f |= TF_CAN_MULTI_CONN
        return f


@dataclasses.dataclass(frozen=True)
class Ready:
    """Transmission begins. Server side: ``export`` is the ``Export`` chosen. Client side: the
    export as the server described it (``flags`` = transmission flags) and ``contexts``
    ({id: name}) of the selected meta contexts."""

    export: Export
    flags: int = 0
    structured: bool = False
    contexts: tuple = ()


@dataclasses.dataclass(frozen=True)
class Refused:
    """Client side: the server refused the export (``reply_type`` an ERR_* value, ``message`` its
    text for people)."""

    option: int
    reply_type: int
    message: str


@dataclasses.dataclass(slots=True)
class Command:
    """Server side: one request. ``kind`` a ``Cmd`` (or the raw number when unknown), ``data``
    the WRITE payload (a buffer from the connection's ``alloc``, the caller's from then on),
    ``error`` the NBD errno to answer with when the request cannot be served (``message`` says
    why), ``fatal`` True when the connection must close after that answer. Built once per request
    on the hot path, so not frozen: treat it as a value."""

    kind: int
    flags: int
    cookie: int
    offset: int
    length: int
    data: bytes | memoryview | None = None
    error: int = 0
    message: str = ""
    fatal: bool = False

    @property
    def fua(self) -> bool:
        return bool(self.flags & CMD_FLAG_FUA)


@dataclasses.dataclass(frozen=True)
class Disconnect:
    """Server side: the client sent DISC. Finish the requests in flight, then close."""


@dataclasses.dataclass(slots=True)
class Reply:
    """Client side: request ``cookie`` is done. ``error`` 0 or an NBD errno (``message`` from an
    error chunk, ``offset`` where an ERROR_OFFSET chunk placed it); ``extents`` for BLOCK_STATUS:
    a tuple of (length, flags) per selected context id, ``{id: extents}``."""

    cookie: int
    kind: int
    error: int = 0
    message: str = ""
    offset: int | None = None
    extents: dict | None = None


# -- the receive buffer ---------------------------------------------------------------------------
class _Buffer:
    """Bytes received and not yet parsed."""

    __slots__ = ("_data", "_pos")

    def __init__(self):
        self._data = bytearray()
        self._pos = 0

    def feed(self, data):
        if self._pos:
            if self._pos == len(self._data):
                self._data.clear()
                self._pos = 0
            elif self._pos >= len(self._data) // 2:
                del self._data[: self._pos]
                self._pos = 0
        self._data += data

    def __len__(self):
        return len(self._data) - self._pos

    def peek(self, n):
        """A memoryview of the next ``n`` bytes (valid until the next ``feed``), or None."""
        if len(self._data) - self._pos < n:
            return None
        return memoryview(self._data)[self._pos : self._pos + n]

    def skip(self, n):
        self._pos += n

    def take(self, n):
        """The next ``n`` bytes as ``bytes``, or None."""
        if len(self._data) - self._pos < n:
            return None
        out = bytes(self._data[self._pos : self._pos + n])
        self._pos += n
        return out


def _string(payload, pos, what):
    """(str, new position) for a ``u32 length, bytes`` string at ``pos``; ``ValueError`` if bad."""
    if pos + 4 > len(payload):
        raise ValueError(f"{what}: truncated length")
    (n,) = _u32.unpack_from(payload, pos)
    if n > MAX_STRING:
        raise ValueError(f"{what}: length {n} over {MAX_STRING}")
    if pos + 4 + n > len(payload):
        raise ValueError(f"{what}: inconsistent lengths")
    try:
        return bytes(payload[pos + 4 : pos + 4 + n]).decode("utf-8"), pos + 4 + n
    except UnicodeDecodeError:
        raise ValueError(f"{what}: not UTF-8") from None


def _move(role, table, state, event):
    try:
        return table[state][event]
    except KeyError:
        raise LocalProtocolError(f"{role}: {event!r} is illegal in state {state.name}") from None


# -- encoders shared by tests and both sides -----------------------------------------------------
def encode_option(option: int, data: bytes = b"") -> bytes:
    return _option.pack(IHAVEOPT, option, len(data)) + data


def encode_option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _option_reply.pack(OPT_REPLY_MAGIC, option, reply_type, len(data)) + data


def encode_info_request(name: str, infos=()) -> bytes:
    raw = name.encode()
    return _u32.pack(len(raw)) + raw + _u16.pack(len(infos)) + b"".join(_u16.pack(i) for i in infos)


def encode_meta_request(name: str, queries) -> bytes:
    raw = name.encode()
    out = [_u32.pack(len(raw)), raw, _u32.pack(len(queries))]
    for q in queries:
        q = q.encode()
        out += [_u32.pack(len(q)), q]
    return b"".join(out)


def encode_request(
    kind: int, cookie: int, offset: int = 0, length: int = 0, flags: int = 0
) -> bytes:
    return _request.pack(REQUEST_MAGIC, flags, kind, cookie, offset, length)


def encode_simple_reply(cookie: int, error: int = 0) -> bytes:
    return _simple_reply.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def encode_chunk(cookie: int, ctype: int, payload: bytes = b"", done: bool = True) -> bytes:
    return (
        _chunk.pack(STRUCTURED_REPLY_MAGIC, CHUNK_DONE if done else 0, ctype, cookie, len(payload))
        + payload
    )


def encode_error_chunk(cookie: int, error: int, message: str = "", offset=None, done=True) -> bytes:
    msg = message.encode()[:MAX_STRING]
    payload = _u32.pack(error) + _u16.pack(len(msg)) + msg
    if offset is None:
        return encode_chunk(cookie, CHUNK_ERROR, payload, done)
    return encode_chunk(cookie, CHUNK_ERROR_OFFSET, payload + _u64.pack(offset), done)


def encode_extents(extents) -> bytes:
    return b"".join(_extent.pack(n, f) for n, f in extents)


# -- server ----------------------------------------------------------------------------------------
class ServerConnection:
    """The server side of one connection. See the module docstring.

    Args:
        exports: the ``Export`` objects offered, by name (the name "" is the default export; a
            client asking for "" gets the only export when there is just one).
        alloc: ``alloc(length)`` returns a writable buffer of ``length`` bytes for a WRITE
            payload (aligned memory lets the payload reach the disk without another copy);
            ``bytearray`` by default.
    """

    role = "server"

    def __init__(self, exports, alloc=bytearray):
        self._alloc = alloc
        self.exports = {e.name: e for e in exports}
        self.state = State.GREETING
        self.structured = False
        self.no_zeroes = False
        self.fixed = False
        self.export = None
        self.contexts = {}  # selected meta contexts: id -> name
        self._contexts_for = None  # the export name the selection was made for
        self._buf = _Buffer()
        self._out = [_greeting.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)]
        self._eof = False
        self._pending_write = None  # a WRITE header whose payload is still arriving

    # -- caller interface -------------------------------------------------------------------------
    def receive_data(self, data):
        """Bytes from the client; ``b""`` when it closed its end."""
        if data:
            if not self._eof:
                self._buf.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        """Handshake bytes produced so far (greeting, option replies); empty when none."""
        out, self._out = b"".join(self._out), []
        return out

    def next_event(self):
        """``Ready``, ``Command``, ``Disconnect``, ``NEED_DATA`` or ``CLOSED``; raises
        ``RemoteProtocolError`` (the connection moves to ``ERROR``) when the framing breaks."""
        if self.state in (State.CLOSED, State.ERROR):
            if self.state is State.ERROR:
                raise RemoteProtocolError("the connection is in ERROR after a protocol violation")
            return CLOSED
        try:
            ev = self._next()
        except RemoteProtocolError:
            self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "violation")
            raise
        if ev is NEED_DATA and self._eof:
            if self.state is State.DISCONNECTING:
                return CLOSED
            self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "peer_closed")
            return CLOSED
        return ev

    def _next(self):
        if self.state is State.GREETING:
            raw = self._buf.take(4)
            if raw is None:
                return NEED_DATA
            (flags,) = _u32.unpack(raw)
            if flags & ~CLIENT_FLAGS_KNOWN:
                raise RemoteProtocolError(f"unknown client flags {flags:#x}")
            self.fixed = bool(flags & FLAG_FIXED_NEWSTYLE)
            self.no_zeroes = bool(flags & FLAG_NO_ZEROES)
            self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "client_flags")
            return self._next()
        if self.state is State.OPTIONS:
            return self._next_option()
        if self.state is State.TRANSMISSION:
            return self._next_request()
        return NEED_DATA  # DISCONNECTING: the client sends nothing after DISC; ignore it

    # -- handshake ---------------------------------------------------------------------------------
    def _next_option(self):
        while True:
            head = self._buf.peek(_option.size)
            if head is None:
                return NEED_DATA
            magic, option, length = _option.unpack(head)
            if magic != IHAVEOPT:
                raise RemoteProtocolError(f"bad option magic {magic:#x}")
            if length > MAX_OPTION_LENGTH:
                raise RemoteProtocolError(
                    f"option {option} of {length} bytes (limit {MAX_OPTION_LENGTH})"
                )
            if len(self._buf) < _option.size + length:
                return NEED_DATA
            self._buf.skip(_option.size)
            data = self._buf.take(length)
            ev = self._option(option, data)
            if ev is not None:
                return ev

    def _reply(self, option, rtype, data=b""):
        self._out.append(encode_option_reply(option, rtype, data))

    def _error(self, option, rtype, message):
        self._reply(option, rtype, message.encode()[:MAX_STRING])

    def _find(self, name):
        e = self.exports.get(name)
        if e is None and name == "" and len(self.exports) == 1:
            e = next(iter(self.exports.values()))
        return e

    def _option(self, option, data):
        """Answer one option; returns an event when the handshake ends, else None."""
        if not self.fixed and option != Opt.EXPORT_NAME:
            raise RemoteProtocolError(f"option {option} from a client without fixed newstyle")
        if option == Opt.EXPORT_NAME:
            try:
                name = data.decode("utf-8")
            except UnicodeDecodeError:
                raise RemoteProtocolError("EXPORT_NAME: name is not UTF-8") from None
            export = self._find(name)
            if export is None or len(data) > MAX_STRING:
                raise RemoteProtocolError(f"EXPORT_NAME: export {name[:64]!r} not present")
            self._out.append(
                _export_name_reply.pack(export.size, export.transmission_flags(self.structured))
            )
            if not self.no_zeroes:
                self._out.append(bytes(124))
            return self._go(export)
        if option == Opt.ABORT:
            self._reply(option, REP_ACK)
            self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "abort")
            return CLOSED
        if option in (Opt.LIST, Opt.STARTTLS, Opt.STRUCTURED_REPLY) and data:
            self._error(option, ERR_INVALID, f"option {Opt(option).name} has unexpected length")
        elif option == Opt.LIST:
            for name, e in self.exports.items():
                raw = name.encode()
                self._reply(option, REP_SERVER, _u32.pack(len(raw)) + raw + e.description.encode())
            self._reply(option, REP_ACK)
        elif option == Opt.STARTTLS:
            self._error(option, ERR_POLICY, "TLS is not supported by this server")
        elif option == Opt.STRUCTURED_REPLY:
            if self.structured:
                self._error(option, ERR_INVALID, "structured replies already negotiated")
            else:
                self.structured = True
                self._reply(option, REP_ACK)
        elif option in (Opt.INFO, Opt.GO):
            return self._info(option, data)
        elif option in (Opt.LIST_META_CONTEXT, Opt.SET_META_CONTEXT):
            self._meta(option, data)
        else:
            self._error(option, ERR_UNSUP, f"option {option} is not supported")
        self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "option")
        return None

    def _info(self, option, data):
        try:
            name, pos = _string(data, 0, "export name")
            if pos + 2 > len(data):
                raise ValueError("truncated info request count")
            (n,) = _u16.unpack_from(data, pos)
            if pos + 2 + 2 * n != len(data):
                raise ValueError("inconsistent lengths")
            wanted = struct.unpack_from(f">{n}H", data, pos + 2)
        except ValueError as exc:
            self._error(option, ERR_INVALID, f"{Opt(option).name}: {exc}")
            return None
        export = self._find(name)
        if export is None:
            self._error(option, ERR_UNKNOWN, f"export {name!r} not present")
            return None
        if INFO_NAME in wanted:
            raw = export.name.encode()
            self._reply(option, REP_INFO, _u16.pack(INFO_NAME) + raw)
        if INFO_DESCRIPTION in wanted and export.description:
            self._reply(option, REP_INFO, _u16.pack(INFO_DESCRIPTION) + export.description.encode())
        self._reply(
            option,
            REP_INFO,
            _info_block_size.pack(
                INFO_BLOCK_SIZE, export.min_block, export.pref_block, export.max_payload
            ),
        )
        self._reply(
            option,
            REP_INFO,
            _info_export.pack(INFO_EXPORT, export.size, export.transmission_flags(self.structured)),
        )
        self._reply(option, REP_ACK)
        if option == Opt.GO:
            return self._go(export)
        return None

    def _go(self, export):
        self.export = export
        if self._contexts_for != export.name:
            self.contexts = {}
        self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "go")
        return Ready(
            export,
            export.transmission_flags(self.structured),
            self.structured,
            tuple(self.contexts.items()),
        )

    def _meta(self, option, data):
        try:
            name, pos = _string(data, 0, "export name")
            if pos + 4 > len(data):
                raise ValueError("truncated query count")
            (nq,) = _u32.unpack_from(data, pos)
            pos += 4
            queries = []
            for _ in range(nq):
                q, pos = _string(data, pos, "query")
                queries.append(q)
            if pos != len(data):
                raise ValueError("inconsistent lengths")
        except ValueError as exc:
            self._error(option, ERR_INVALID, f"{Opt(option).name}: {exc}")
            if option == Opt.SET_META_CONTEXT:
                self.contexts = {}
            return
        if option == Opt.SET_META_CONTEXT:
            self.contexts = {}  # a SET replaces earlier selections, even when it fails
            if not self.structured:
                self._error(option, ERR_INVALID, "SET_META_CONTEXT needs structured replies first")
                return
        if self._find(name) is None:
            self._error(option, ERR_UNKNOWN, f"export {name!r} not present")
            return
        if option == Opt.LIST_META_CONTEXT:
            match = not queries or any(q in ("base:", BASE_ALLOCATION) for q in queries)
        else:
            match = BASE_ALLOCATION in queries
        if match:
            self._reply(
                option,
                REP_META_CONTEXT,
                _u32.pack(0 if option == Opt.LIST_META_CONTEXT else 1) + BASE_ALLOCATION.encode(),
            )
            if option == Opt.SET_META_CONTEXT:
                self.contexts = {1: BASE_ALLOCATION}
                self._contexts_for = self._find(name).name
        self._reply(option, REP_ACK)

    # -- transmission ------------------------------------------------------------------------------
    def _next_request(self):
        buf = self._buf
        pw = self._pending_write
        if pw is not None:
            payload = buf.peek(pw.length)
            if payload is None:
                return NEED_DATA
            data = self._alloc(pw.length)
            data[:] = payload
            payload.release()
            buf.skip(pw.length)
            self._pending_write = None
            pw.data = data
            return pw
        head = buf.peek(28)
        if head is None:
            return NEED_DATA
        magic, flags, kind, cookie, offset, length = _request_unpack(head)
        head.release()
        if magic != REQUEST_MAGIC:
            raise RemoteProtocolError(f"bad request magic {magic:#x}")
        buf.skip(28)
        e = self.export
        # the common case, checked inline: a known command, its flags, inside the export
        if (
            kind in _PLAIN
            and not flags & _PLAIN[kind]
            and offset + length <= e.size
            and length <= e.max_payload
            and (kind != 1 or not e.read_only)
        ):
            cmd = Command(_CMDS[kind], flags, cookie, offset, length)
            if kind == 1 and length:  # WRITE: its payload follows
                self._pending_write = cmd
                return self._next_request()
            if kind == 1:
                cmd.data = b""
            return cmd
        if kind == Cmd.DISC:
            self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "disc")
            return Disconnect()
        error, message = self._check(kind, flags, offset, length)
        if kind == Cmd.WRITE:
            if length > e.max_payload:
                self.state = _move(self.role, SERVER_TRANSITIONS, self.state, "fatal_request")
                return Command(
                    kind,
                    flags,
                    cookie,
                    offset,
                    length,
                    None,
                    NBD_EINVAL,
                    f"WRITE of {length} bytes over the maximum {e.max_payload}",
                    fatal=True,
                )
            cmd = Command(Cmd.WRITE, flags, cookie, offset, length, None, error, message)
            if length:
                self._pending_write = cmd
                return self._next_request()
            cmd.data = b""
            return cmd
        return Command(
            Cmd(kind) if kind in _VALID_FLAGS else kind,
            flags,
            cookie,
            offset,
            length,
            None,
            error,
            message,
        )

    def _check(self, kind, flags, offset, length):
        """(NBD errno, message) for a request this export cannot serve; (0, "") otherwise."""
        e = self.export
        if kind not in _VALID_FLAGS:
            return NBD_EINVAL, f"invalid request type {kind}"
        if flags & ~_VALID_FLAGS[kind]:
            return NBD_EINVAL, f"unsupported flags {flags:#x} for {Cmd(kind).name}"
        if flags & CMD_FLAG_DF and not self.structured:
            return NBD_EINVAL, "DF needs structured replies"
        writes = kind in (Cmd.WRITE, Cmd.TRIM, Cmd.WRITE_ZEROES)
        if writes and e.read_only:
            return NBD_EPERM, "export is read-only"
        if kind == Cmd.FLUSH:
            return 0, ""
        if kind in (Cmd.READ, Cmd.CACHE) and length > e.max_payload:
            return NBD_EINVAL, f"length {length} over the maximum {e.max_payload}"
        if offset + length > e.size:
            return (NBD_ENOSPC if writes else NBD_EINVAL), "request past the end of the export"
        if kind == Cmd.BLOCK_STATUS:
            if not self.contexts:
                return NBD_EINVAL, "BLOCK_STATUS without a negotiated meta context"
            if not length:
                return NBD_EINVAL, "BLOCK_STATUS needs a non-zero length"
        if kind == Cmd.TRIM and not e.can_trim or kind == Cmd.WRITE_ZEROES and not e.can_zero:
            return NBD_EINVAL, f"{Cmd(kind).name} is not supported by this export"
        return 0, ""

    # -- replies -----------------------------------------------------------------------------------
    def reply(self, cmd: Command, error: int = 0, message: str = "") -> list:
        """The buffers that answer ``cmd`` (not a successful READ) with ``error`` (an NBD errno)."""
        if self.structured and error:
            return [encode_error_chunk(cmd.cookie, error, message)]
        if self.structured and cmd.kind == Cmd.READ:
            return [encode_chunk(cmd.cookie, CHUNK_NONE)]
        return [encode_simple_reply(cmd.cookie, error)]

    def reply_read(self, cmd: Command, data) -> list:
        """The buffers that answer a successful READ with ``data`` (``cmd.length`` bytes, sent
        without a copy)."""
        if self.structured:
            return [
                _chunk.pack(
                    STRUCTURED_REPLY_MAGIC, CHUNK_DONE, CHUNK_OFFSET_DATA, cmd.cookie, 8 + len(data)
                )
                + _u64.pack(cmd.offset),
                data,
            ]
        return [encode_simple_reply(cmd.cookie), data]

    def reply_block_status(self, cmd: Command, extents) -> list:
        """The buffers that answer BLOCK_STATUS with ``extents``: (length, flags) pairs from
        ``cmd.offset`` on, at least one. Equal neighbours are merged and the extents clipped to
        the request; with REQ_ONE only the first is sent."""
        merged = []
        covered = 0
        for n, f in extents:
            if covered >= cmd.length:
                break
            n = min(n, cmd.length - covered)  # nothing past the request: lengths stay u32
            if n <= 0:
                continue
            covered += n
            if merged and merged[-1][1] == f:
                merged[-1][0] += n
            else:
                merged.append([n, f])
            if len(merged) > MAX_EXTENTS:
                merged.pop()
                break
        if not merged:
            raise LocalProtocolError("BLOCK_STATUS reply without an extent")
        if cmd.flags & CMD_FLAG_REQ_ONE:
            merged = [[min(merged[0][0], cmd.length), merged[0][1]]]
        out = []
        ids = list(self.contexts)
        for i, cid in enumerate(ids):
            payload = _u32.pack(cid) + b"".join(_extent.pack(n, f) for n, f in merged)
            out.append(
                encode_chunk(cmd.cookie, CHUNK_BLOCK_STATUS, payload, done=i == len(ids) - 1)
            )
        return out


# -- client ----------------------------------------------------------------------------------------
@dataclasses.dataclass(slots=True)
class _Pending:
    kind: int
    offset: int
    length: int
    buffer: memoryview | None
    error: int = 0
    message: str = ""
    error_offset: int | None = None
    extents: dict | None = None


class ClientConnection:
    """The client side of one connection. See the module docstring.

    Args:
        export: the export name to GO to.
        structured: ask for structured replies (and then for ``base:allocation``).
        contexts: the meta contexts to SET (needs structured replies).
    """

    role = "client"

    def __init__(self, export: str = "", structured: bool = True, contexts=(BASE_ALLOCATION,)):
        self.export_name = export
        self.want_structured = structured
        self.want_contexts = tuple(contexts) if structured else ()
        self.state = State.GREETING
        self.structured = False
        self.contexts = {}
        self.export = None
        self.flags = 0
        self._buf = _Buffer()
        self._out = []
        self._eof = False
        self._step = None  # the option in flight
        self._size = None
        self._block = (1, 4096, MAX_PAYLOAD)
        self._pending = {}
        self._chunk = None  # header of a structured chunk whose payload is still arriving

    def receive_data(self, data):
        if data:
            if not self._eof:
                self._buf.feed(data)
        else:
            self._eof = True

    def data_to_send(self) -> bytes:
        out, self._out = b"".join(self._out), []
        return out

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def next_event(self):
        """``Ready``, ``Refused``, ``Reply``, ``NEED_DATA`` or ``CLOSED``; raises
        ``RemoteProtocolError`` (state ``ERROR``) when the server breaks the protocol."""
        if self.state is State.ERROR:
            raise RemoteProtocolError("the connection is in ERROR after a protocol violation")
        if self.state is State.CLOSED:
            return CLOSED
        try:
            ev = self._next()
        except RemoteProtocolError:
            self.state = _move(self.role, CLIENT_TRANSITIONS, self.state, "violation")
            raise
        if ev is NEED_DATA and self._eof:
            self.state = _move(self.role, CLIENT_TRANSITIONS, self.state, "peer_closed")
            return CLOSED
        return ev

    def _next(self):
        if self.state is State.GREETING:
            raw = self._buf.take(_greeting.size)
            if raw is None:
                return NEED_DATA
            magic, opt, hflags = _greeting.unpack(raw)
            if magic != NBDMAGIC or opt != IHAVEOPT:
                raise RemoteProtocolError("not an NBD newstyle server (bad greeting magic)")
            if not hflags & FLAG_FIXED_NEWSTYLE:
                raise RemoteProtocolError("the server does not speak fixed newstyle")
            self._out.append(_u32.pack(FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)))
            self.state = _move(self.role, CLIENT_TRANSITIONS, self.state, "greeting")
            if self.want_structured:
                self._send_option(Opt.STRUCTURED_REPLY)
            else:
                self._send_go()
            return self._next()
        if self.state is State.OPTIONS:
            return self._next_option_reply()
        return self._next_reply()

    def _send_option(self, option, data=b""):
        self._step = option
        self._out.append(encode_option(option, data))

    def _send_go(self):
        self._send_option(Opt.GO, encode_info_request(self.export_name, (INFO_BLOCK_SIZE,)))

    def _next_option_reply(self):
        while True:
            head = self._buf.peek(_option_reply.size)
            if head is None:
                return NEED_DATA
            magic, option, rtype, length = _option_reply.unpack(head)
            if magic != OPT_REPLY_MAGIC:
                raise RemoteProtocolError(f"bad option reply magic {magic:#x}")
            if option != self._step:
                raise RemoteProtocolError(
                    f"reply to option {option} while {self._step} is in flight"
                )
            if length > MAX_OPTION_LENGTH:
                raise RemoteProtocolError(f"option reply of {length} bytes")
            if len(self._buf) < _option_reply.size + length:
                return NEED_DATA
            self._buf.skip(_option_reply.size)
            data = self._buf.take(length)
            ev = self._option_reply(option, rtype, data)
            if ev is not None:
                return ev

    def _option_reply(self, option, rtype, data):
        if option == Opt.STRUCTURED_REPLY:
            if rtype == REP_ACK:
                self.structured = True
                if self.want_contexts:
                    self._send_option(
                        Opt.SET_META_CONTEXT,
                        encode_meta_request(self.export_name, self.want_contexts),
                    )
                    return None
            elif not rtype & REP_ERR:
                raise RemoteProtocolError(f"STRUCTURED_REPLY answered with reply type {rtype}")
            self._send_go()
            return None
        if option == Opt.SET_META_CONTEXT:
            if rtype == REP_META_CONTEXT:
                try:
                    (cid,) = _u32.unpack_from(data)
                    self.contexts[cid] = bytes(data[4:]).decode("utf-8")
                except (struct.error, UnicodeDecodeError):
                    raise RemoteProtocolError("malformed META_CONTEXT reply") from None
                return None
            if rtype != REP_ACK:
                self.contexts = {}
            self._send_go()
            return None
        # GO
        if rtype == REP_INFO:
            if len(data) < 2:
                raise RemoteProtocolError("INFO reply without a type")
            (itype,) = _u16.unpack_from(data)
            if itype == INFO_EXPORT:
                if len(data) != _info_export.size:
                    raise RemoteProtocolError("INFO_EXPORT of the wrong length")
                _, self._size, self.flags = _info_export.unpack(data)
            elif itype == INFO_BLOCK_SIZE:
                if len(data) != _info_block_size.size:
                    raise RemoteProtocolError("INFO_BLOCK_SIZE of the wrong length")
                self._block = _info_block_size.unpack(data)[1:]
            return None
        if rtype == REP_ACK:
            if self._size is None:
                raise RemoteProtocolError("GO acknowledged without INFO_EXPORT")
            mn, pref, mx = self._block
            self.export = Export(
                self.export_name,
                self._size,
                bool(self.flags & TF_READ_ONLY),
                bool(self.flags & TF_CAN_MULTI_CONN),
                "",
                mn,
                pref,
                mx,
                bool(self.flags & TF_SEND_TRIM),
                bool(self.flags & TF_SEND_WRITE_ZEROES),
            )
            self.state = _move(self.role, CLIENT_TRANSITIONS, self.state, "go")
            return Ready(self.export, self.flags, self.structured, tuple(self.contexts.items()))
        if rtype & REP_ERR:
            self.state = _move(self.role, CLIENT_TRANSITIONS, self.state, "refused")
            self._out.append(encode_option(Opt.ABORT))
            return Refused(option, rtype, bytes(data).decode("utf-8", "replace"))
        raise RemoteProtocolError(f"GO answered with reply type {rtype}")

    # -- transmission ------------------------------------------------------------------------------
    def request(
        self,
        kind: int,
        cookie: int,
        offset: int = 0,
        length: int = 0,
        flags: int = 0,
        data=None,
        buffer=None,
    ) -> list:
        """The buffers that send one request. ``data``: the WRITE payload (sent without a copy);
        ``buffer``: where a READ's ``length`` bytes go (a writable buffer). DISC ends the session:
        no request may follow it."""
        if self.state is not State.TRANSMISSION:
            raise LocalProtocolError(f"client: request in state {self.state.name}")
        if kind == Cmd.DISC:
            self.state = _move(self.role, CLIENT_TRANSITIONS, self.state, "disc")
            return [encode_request(Cmd.DISC, cookie)]
        if cookie in self._pending:
            raise LocalProtocolError(f"client: cookie {cookie} is still in flight")
        if kind == Cmd.WRITE:
            if data is None or len(data) != length:
                raise LocalProtocolError("client: WRITE needs a payload of exactly length bytes")
        elif kind == Cmd.READ:
            if buffer is None or len(buffer) != length:
                raise LocalProtocolError("client: READ needs a buffer of exactly length bytes")
            buffer = memoryview(buffer).cast("B")
        elif kind == Cmd.BLOCK_STATUS and not self.contexts:
            raise LocalProtocolError("client: BLOCK_STATUS without a negotiated meta context")
        self._pending[cookie] = _Pending(kind, offset, length, buffer if kind == Cmd.READ else None)
        head = encode_request(kind, cookie, offset, length, flags)
        return [head, data] if kind == Cmd.WRITE and length else [head]

    def _next_reply(self):
        ch = self._chunk
        if ch is not None:
            return self._chunk_payload(ch)
        head = self._buf.peek(4)
        if head is None:
            return NEED_DATA
        (magic,) = _u32.unpack(head)
        if magic == SIMPLE_REPLY_MAGIC:
            head = self._buf.peek(_simple_reply.size)
            if head is None:
                return NEED_DATA
            _, error, cookie = _simple_reply.unpack(head)
            p = self._pending.get(cookie)
            if p is None:
                raise RemoteProtocolError(f"simple reply to unknown cookie {cookie:#x}")
            if p.kind == Cmd.READ and self.structured and not error:
                raise RemoteProtocolError(
                    "simple reply with data to a READ after structured replies"
                )
            if p.kind == Cmd.READ and not error:
                if len(self._buf) < _simple_reply.size + p.length:
                    return NEED_DATA
                self._buf.skip(_simple_reply.size)
                data = self._buf.peek(p.length)
                p.buffer[:] = data
                self._buf.skip(p.length)
            else:
                self._buf.skip(_simple_reply.size)
            return self._done(cookie, p, error)
        if magic == STRUCTURED_REPLY_MAGIC and self.structured:
            head = self._buf.peek(_chunk.size)
            if head is None:
                return NEED_DATA
            _, cflags, ctype, cookie, length = _chunk.unpack(head)
            p = self._pending.get(cookie)
            if p is None:
                raise RemoteProtocolError(f"chunk for unknown cookie {cookie:#x}")
            if length > p.length + MAX_STRING + 64 and length > 8 * MAX_EXTENTS + 4:
                raise RemoteProtocolError(f"chunk of {length} bytes for a request of {p.length}")
            self._buf.skip(_chunk.size)
            self._chunk = (cflags, ctype, cookie, length, p)
            return self._chunk_payload(self._chunk)
        raise RemoteProtocolError(f"bad reply magic {magic:#x}")

    def _chunk_payload(self, ch):
        cflags, ctype, cookie, length, p = ch
        data = self._buf.peek(length)
        if data is None:
            return NEED_DATA
        self._chunk = None
        try:
            self._chunk_apply(ctype, data, p)
        finally:
            data.release()
            self._buf.skip(length)
        if cflags & CHUNK_DONE:
            return self._done(cookie, p, p.error)
        return self._next_reply()

    def _chunk_apply(self, ctype, data, p):
        n = len(data)
        if ctype == CHUNK_NONE:
            if n:
                raise RemoteProtocolError("NONE chunk with a payload")
        elif ctype in (CHUNK_OFFSET_DATA, CHUNK_OFFSET_HOLE):
            if p.kind != Cmd.READ:
                raise RemoteProtocolError("read data for a request that is not a READ")
            if ctype == CHUNK_OFFSET_DATA:
                if n < 9:
                    raise RemoteProtocolError("OFFSET_DATA chunk too short")
                (off,) = _u64.unpack_from(data)
                size = n - 8
            else:
                if n != 12:
                    raise RemoteProtocolError("OFFSET_HOLE chunk of the wrong length")
                off, size = struct.unpack_from(">QI", data)
            rel = off - p.offset
            if rel < 0 or rel + size > p.length or not size:
                raise RemoteProtocolError(f"read chunk [{off}, +{size}) outside the request")
            if ctype == CHUNK_OFFSET_DATA:
                p.buffer[rel : rel + size] = data[8:]
            else:
                p.buffer[rel : rel + size] = bytes(size)
        elif ctype == CHUNK_BLOCK_STATUS:
            if p.kind != Cmd.BLOCK_STATUS or n < 12 or (n - 4) % 8:
                raise RemoteProtocolError("malformed BLOCK_STATUS chunk")
            (cid,) = _u32.unpack_from(data)
            if cid not in self.contexts:
                raise RemoteProtocolError(f"BLOCK_STATUS for unknown context id {cid}")
            ext = tuple(_extent.iter_unpack(data[4:]))
            if any(e[0] == 0 for e in ext):
                raise RemoteProtocolError("BLOCK_STATUS extent of length 0")
            if p.extents is None:
                p.extents = {}
            p.extents[cid] = ext
        elif ctype & (1 << 15):
            if n < 6:
                raise RemoteProtocolError("error chunk too short")
            err, mlen = struct.unpack_from(">IH", data)
            if 6 + mlen > n:
                raise RemoteProtocolError("error chunk message overruns it")
            p.error = err or NBD_EINVAL
            p.message = bytes(data[6 : 6 + mlen]).decode("utf-8", "replace")
            if ctype == CHUNK_ERROR_OFFSET and n >= 14 + mlen:
                (p.error_offset,) = _u64.unpack_from(data, 6 + mlen)
        else:
            raise RemoteProtocolError(f"unknown chunk type {ctype}")

    def _done(self, cookie, p, error):
        del self._pending[cookie]
        self.state = _move(self.role, CLIENT_TRANSITIONS, self.state, "reply")
        return Reply(cookie, p.kind, error, p.message, p.error_offset, p.extents)

"""The client side of an NBD connection, sans I/O: ``ClientConnection`` and its state table.

``ClientConnection`` drives the handshake itself (structured replies, ``base:allocation``, GO
with a BLOCK_SIZE request) and reports ``Ready`` or ``Refused``. Reads name the buffer the data
goes to; chunks are checked (inside the request, known cookie) and copied there, holes zeroed,
and one ``Reply`` event comes out per request when it is done. A server that breaks the protocol
raises ``RemoteProtocolError`` and the connection is in ``ERROR``. The phases and their legal
moves are ``CLIENT_TRANSITIONS``. The session as a whole: ``vblock.nbd.protocol``.

Contract:

* Threads: none of its own, and no locks: the caller serialises every call (``request`` and the
  receiving side share the table of requests in flight; ``NbdFile`` holds one lock around both).
* Ownership: ``request`` returns lists of buffers; a WRITE's ``data`` goes out without a copy, so
  the caller keeps it unchanged until they are sent. A READ's ``buffer`` is written by
  ``next_event`` as chunks arrive and is the caller's again once its ``Reply`` came out.
* Units: offsets, lengths and sizes in bytes; ``Reply.error`` is an NBD errno value
  (``wire.host_errno`` maps it).
"""

from __future__ import annotations

import dataclasses
import struct

from vblock.nbd.events import (
    CLOSED,
    NEED_DATA,
    Export,
    LocalProtocolError,
    Ready,
    Refused,
    RemoteProtocolError,
    Reply,
    State,
    _move,
)
from vblock.nbd.wire import (
    BASE_ALLOCATION,
    CHUNK_BLOCK_STATUS,
    CHUNK_DONE,
    CHUNK_ERROR_OFFSET,
    CHUNK_NONE,
    CHUNK_OFFSET_DATA,
    CHUNK_OFFSET_HOLE,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_EXTENTS,
    MAX_OPTION_LENGTH,
    MAX_PAYLOAD,
    MAX_STRING,
    NBD_EINVAL,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REP_ACK,
    REP_ERR,
    REP_INFO,
    REP_META_CONTEXT,
    SIMPLE_REPLY_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    TF_CAN_MULTI_CONN,
    TF_READ_ONLY,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
    Cmd,
    Opt,
    _Buffer,
    _chunk,
    _extent,
    _greeting,
    _info_block_size,
    _info_export,
    _option_reply,
    _simple_reply,
    _u16,
    _u32,
    _u64,
    encode_info_request,
    encode_meta_request,
    encode_option,
    encode_request,
)

__all__ = ["ClientConnection", "CLIENT_TRANSITIONS"]


# Event-triggered transitions: state -> {event name: next state}. Every other (state, event)
# pair is illegal. "peer_closed" is the peer's EOF, "violation" a RemoteProtocolError.
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

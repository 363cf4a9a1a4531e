"""The server side of an NBD connection, sans I/O: ``ServerConnection`` and its state table.

``ServerConnection`` answers the whole handshake itself from the ``Export`` objects it was given;
the caller sees one ``Ready`` event when transmission starts, then ``Command`` events. A command
the protocol frames correctly but that cannot be served (unknown type, bad flags, out of range,
read-only, too large) comes out with ``error`` set to the NBD errno to answer with: the caller
replies with it and the connection lives. A WRITE too large to buffer is answered with EINVAL and
then the connection closes (``Command.fatal``), as the payload is never read. Framing that cannot
be trusted (bad magic, a handshake option that breaks the rules the spec says MUST be dropped)
raises ``RemoteProtocolError`` and the connection is in ``ERROR``: drop it. The phases and their
legal moves are ``SERVER_TRANSITIONS``. The session as a whole: ``vblock.nbd.protocol``.

Contract:

* Threads: ``receive_data``, ``next_event`` and ``data_to_send`` belong to one thread at a time
  (the connection's receiving thread). Once ``Ready`` came out, ``reply``, ``reply_read`` and
  ``reply_block_status`` may be called from any thread, concurrently: they only read what the
  handshake fixed (structured replies, the selected contexts) and build new buffers.
* Ownership: a WRITE payload is copied out of the receive buffer into ``alloc(length)`` and
  belongs to the caller from the moment its ``Command`` is returned. The reply methods return
  lists of buffers; a READ's ``data`` goes out without a copy, so the caller keeps it unchanged
  until those buffers are sent.
* Units: offsets, lengths and sizes in bytes; errors are NBD errno values (``wire.nbd_errno``).
* ``_next_request`` is the per-request path: the common READ/WRITE is admitted inline against
  the module-global tables of ``wire`` (no extra call).
"""

from __future__ import annotations

import struct

from vblock.nbd.events import (
    CLOSED,
    NEED_DATA,
    Command,
    Disconnect,
    LocalProtocolError,
    Ready,
    RemoteProtocolError,
    State,
    _move,
)
from vblock.nbd.wire import (
    _CMDS,
    _PLAIN,
    _VALID_FLAGS,
    BASE_ALLOCATION,
    CHUNK_BLOCK_STATUS,
    CHUNK_DONE,
    CHUNK_NONE,
    CHUNK_OFFSET_DATA,
    CLIENT_FLAGS_KNOWN,
    CMD_FLAG_DF,
    CMD_FLAG_REQ_ONE,
    ERR_INVALID,
    ERR_POLICY,
    ERR_UNKNOWN,
    ERR_UNSUP,
    FLAG_FIXED_NEWSTYLE,
    FLAG_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    INFO_DESCRIPTION,
    INFO_EXPORT,
    INFO_NAME,
    MAX_EXTENTS,
    MAX_OPTION_LENGTH,
    MAX_STRING,
    NBD_EINVAL,
    NBD_ENOSPC,
    NBD_EPERM,
    NBDMAGIC,
    REP_ACK,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REQUEST_MAGIC,
    STRUCTURED_REPLY_MAGIC,
    Cmd,
    Opt,
    _Buffer,
    _chunk,
    _export_name_reply,
    _extent,
    _greeting,
    _info_block_size,
    _info_export,
    _option,
    _request_unpack,
    _string,
    _u16,
    _u32,
    _u64,
    encode_chunk,
    encode_error_chunk,
    encode_option_reply,
    encode_simple_reply,
)

__all__ = ["ServerConnection", "SERVER_TRANSITIONS"]


# Event-triggered transitions: state -> {event name: next state}. Every other (state, event)
# pair is illegal. "peer_closed" is the peer's EOF, "violation" a RemoteProtocolError.
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

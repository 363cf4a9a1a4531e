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
All integers are big-endian; ``wire`` holds their layouts.

``ServerConnection`` and ``ClientConnection`` never see a socket, exactly like h11: the caller
feeds received bytes with ``receive_data`` (``b""`` when the peer closed), pulls events with
``next_event()`` (an event object or the sentinels ``NEED_DATA`` / ``CLOSED``), and writes what
``data_to_send()`` returns plus whatever the reply and request methods return (lists of buffers,
so payloads go out without a copy).

The server side answers the whole handshake itself and hands its caller ``Command`` events; the
client side drives the handshake itself and hands its caller one ``Reply`` per request. Each
side's module docstring holds its contract (errors per request, threads, buffer ownership).

The phases of each side and their legal moves are the tables ``SERVER_TRANSITIONS`` and
``CLIENT_TRANSITIONS``; ``_move`` is the only place a state changes, and an illegal move raises
``LocalProtocolError`` naming the role, state and event.

The parts
---------
* ``wire``: the constants by their ``doc/proto.md`` names, the struct layouts, the errno mapping
  (``nbd_errno`` / ``host_errno``), the ``encode_*`` functions and the receive buffer.
* ``events``: what both state machines hand their caller: the events, the sentinels, the errors,
  the phases (``State``) and ``_move``.
* ``server_protocol``: ``ServerConnection`` and ``SERVER_TRANSITIONS``.
* ``client_protocol``: ``ClientConnection`` and ``CLIENT_TRANSITIONS``.

This module defines nothing of its own: it gathers the parts, so ``from vblock.nbd import
protocol as P`` and ``from vblock.nbd.protocol import X`` keep working for every public name the
parts define (and for the few private ones the tests and fuzz targets reach: ``_VALID_FLAGS``,
``_TO_HOST``, ``_move``, ``_Pending``). They are the same objects, not copies.
"""

from __future__ import annotations

from vblock.nbd.client_protocol import CLIENT_TRANSITIONS, ClientConnection, _Pending  # noqa: F401
from vblock.nbd.events import (  # noqa: F401
    CLOSED,
    NEED_DATA,
    Command,
    Disconnect,
    Export,
    LocalProtocolError,
    ProtocolError,
    Ready,
    Refused,
    RemoteProtocolError,
    Reply,
    State,
    _move,
)
from vblock.nbd.server_protocol import SERVER_TRANSITIONS, ServerConnection  # noqa: F401
from vblock.nbd.wire import (  # noqa: F401
    _TO_HOST,
    _VALID_FLAGS,
    BASE_ALLOCATION,
    CHUNK_BLOCK_STATUS,
    CHUNK_DONE,
    CHUNK_ERROR,
    CHUNK_ERROR_OFFSET,
    CHUNK_NONE,
    CHUNK_OFFSET_DATA,
    CHUNK_OFFSET_HOLE,
    CLIENT_FLAGS_KNOWN,
    CMD_FLAG_DF,
    CMD_FLAG_FAST_ZERO,
    CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE,
    CMD_FLAG_REQ_ONE,
    ERR_BLOCK_SIZE_REQD,
    ERR_INVALID,
    ERR_PLATFORM,
    ERR_POLICY,
    ERR_SHUTDOWN,
    ERR_TLS_REQD,
    ERR_TOO_BIG,
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
    MAX_PAYLOAD,
    MAX_STRING,
    NBD_EINVAL,
    NBD_EIO,
    NBD_ENOMEM,
    NBD_ENOSPC,
    NBD_ENOTSUP,
    NBD_EOVERFLOW,
    NBD_EPERM,
    NBD_ESHUTDOWN,
    NBDMAGIC,
    OPT_REPLY_MAGIC,
    REP_ACK,
    REP_ERR,
    REP_INFO,
    REP_META_CONTEXT,
    REP_SERVER,
    REQUEST_MAGIC,
    SIMPLE_REPLY_MAGIC,
    STATE_HOLE,
    STATE_ZERO,
    STRUCTURED_REPLY_MAGIC,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_ROTATIONAL,
    TF_SEND_CACHE,
    TF_SEND_DF,
    TF_SEND_FAST_ZERO,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
    Cmd,
    Opt,
    encode_chunk,
    encode_error_chunk,
    encode_extents,
    encode_info_request,
    encode_meta_request,
    encode_option,
    encode_option_reply,
    encode_request,
    encode_simple_reply,
    host_errno,
    nbd_errno,
)

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

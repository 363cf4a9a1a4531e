"""What the NBD state machines hand their caller: events, sentinels, errors and session phases.

``ServerConnection`` and ``ClientConnection`` (``server_protocol`` and ``client_protocol``) both
speak this vocabulary. ``next_event()`` returns an event object (``Ready``, ``Refused``,
``Command``, ``Disconnect``, ``Reply``) or one of the sentinels ``NEED_DATA`` / ``CLOSED``, and
raises ``RemoteProtocolError`` when the peer broke the rules; ``LocalProtocolError`` is the
caller's mistake. ``Export`` describes what a server offers under one name (sizes in bytes).

``State`` names the phases of a session, the same for both roles; each side's legal moves are its
own table (``SERVER_TRANSITIONS``, ``CLIENT_TRANSITIONS``) and ``_move`` is the only place a state
changes: an illegal move raises ``LocalProtocolError`` naming the role, state and event.

The events are plain values: frozen, except ``Command`` and ``Reply``, which are built once per
request on the hot path and so are slotted and mutable (the connection fills ``Command.data``
before handing it out; from then on it is the caller's). Nothing here holds a lock or a thread.
"""

from __future__ import annotations

import dataclasses
import enum

from vblock.nbd.wire import (
    CMD_FLAG_FUA,
    MAX_PAYLOAD,
    TF_CAN_MULTI_CONN,
    TF_HAS_FLAGS,
    TF_READ_ONLY,
    TF_SEND_CACHE,
    TF_SEND_DF,
    TF_SEND_FLUSH,
    TF_SEND_FUA,
    TF_SEND_TRIM,
    TF_SEND_WRITE_ZEROES,
)

__all__ = [
    "NEED_DATA",
    "CLOSED",
    "State",
    "Export",
    "Ready",
    "Refused",
    "Command",
    "Disconnect",
    "Reply",
    "ProtocolError",
    "LocalProtocolError",
    "RemoteProtocolError",
]


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


def _move(role, table, state, event):
    try:
        return table[state][event]
    except KeyError:
        raise LocalProtocolError(f"{role}: {event!r} is illegal in state {state.name}") from None


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

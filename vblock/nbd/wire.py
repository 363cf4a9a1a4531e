"""The NBD wire format: constants, struct layouts, the errno mapping, encoders, the receive buffer.

Everything here follows ``doc/proto.md`` of the NetworkBlockDevice project and is named as it is
there. All integers on the wire are big-endian. Their layouts are defined here, and the two state
machines pack and unpack through these ``struct.Struct`` objects, apart from three layouts they
unpack inline where they parse them (the INFO request list, an OFFSET_HOLE chunk, the head of an
error chunk). Sizes, offsets and lengths are in bytes.

Contract:

* The constants, the ``Opt``/``Cmd`` enums, the struct layouts, ``nbd_errno``/``host_errno`` and
  the ``encode_*`` functions hold no state: any thread may use them. The encoders return
  ``bytes`` ready to send; tests and the fuzz targets build hostile traffic with them.
* ``_Buffer`` (the bytes received and not yet parsed) belongs to one connection and is not
  thread-safe; a ``peek`` view stays valid until the next ``feed``.
* ``_string`` decodes the spec's ``u32 length, UTF-8 bytes`` strings, raising ``ValueError``.
* Names with a leading underscore are private to ``vblock.nbd``: ``server_protocol`` and
  ``client_protocol`` share them. ``_PLAIN`` and ``_CMDS`` are what the server's per-request
  path reads (as module globals of its own, no attribute hop); ``_VALID_FLAGS`` is the flags each
  command may carry.
"""

from __future__ import annotations

import enum
import errno as _errno
import struct

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


# -- decoding: the receive buffer and the spec's strings -------------------------------------------
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

"""``NbdFile``: an NBD export as a host file, with the asynchronous interface of ``HostFile``.

Drivers reach it through ``vblock.hostio.open_host_file`` with an NBD URI for a path
(``nbd+unix:///EXPORT?socket=PATH`` or ``nbd://HOST:PORT/EXPORT``), so raw images and QED backing
files work over the network unchanged.

Contract (as ``HostFile``'s, where it applies): offsets and lengths in bytes; ``submit_read``,
``submit_write``, ``submit_flush``, ``submit_discard`` and ``submit_zero_range`` send the request
at once (many in flight on one connection) and return a ``vblock.future.Future`` completed on the
connection's receiving thread; the caller keeps the buffers unchanged until then. ``alignment``
is the export's minimum block size (1 unless the server says otherwise), ``mem_alignment`` 1;
requests longer than the server's maximum payload are split. ``seek_data`` / ``seek_hole`` answer
from ``base:allocation`` block status (ranges that read as zeros count as holes), so sparse
copies skip them; without the context everything is data. ``size`` is the export's size; an export
cannot grow (``truncate`` and ``allocate`` raise EOPNOTSUPP).

Errors. A request the server fails completes with ``OSError`` carrying the errno the NBD error
means (``protocol.host_errno``), the operation, the URI, the offset and the server's message. A
connection that drops, or a server that breaks the protocol, fails every request in flight and
every later one with ``OSError(ECONNRESET)`` naming the URI; no request ever completes with data
that did not come from its own reply. ``close()`` waits for requests in flight, sends DISC and
closes the socket.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import threading

from vblock.future import Future, completed, failed, join
from vblock.nbd import protocol as P
from vblock.nbd.uri import parse_uri

__all__ = ["NbdFile", "connect"]

_log = logging.getLogger(__name__)

_RECV_BYTES = 1 << 18


def connect(address, timeout=30.0) -> socket.socket:
    """A connected stream socket to an ``NbdAddress`` (TCP_NODELAY on TCP)."""
    if address.socket is not None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target = address.socket
    else:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        family, _, _, _, target = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    try:
        sock.connect(target)
    except OSError as exc:
        sock.close()
        raise OSError(
            exc.errno, f"cannot connect to the NBD server: {exc.strerror}", address.uri()
        ) from None
    sock.settimeout(None)
    return sock


class NbdFile:
    """A connection to one NBD export. See the module docstring for the contract.

    Args:
        uri: an NBD URI.
        read_only: never write (the export may be writable).
        Other keywords of ``HostFile`` (``direct``, ``engine``, ``create``, ``threads``) are
        accepted and ignored: the server owns caching and I/O.
    """

    direct = False
    mem_alignment = 1
    is_block_device = False
    fd = -1  # no local file
    engine = "nbd"

    def __init__(
        self,
        uri,
        read_only=False,
        direct=None,
        engine=None,
        create=False,
        threads=None,
        timeout=30.0,
    ):
        self.path = uri
        self.address = parse_uri(uri)
        self.read_only = bool(read_only)
        self._proto = P.ClientConnection(self.address.export)
        self._sock = connect(self.address, timeout)
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _futures, _cookie, _dead
        self._idle = threading.Condition(self._lock)
        self._futures = {}  # cookie -> (future, operation, offset, finish)
        self._cookie = 0
        self._dead = None  # the OSError every request gets once the connection is gone
        self._closed = False
        try:
            ready = self._handshake(timeout)
        except BaseException:
            self._sock.close()
            raise
        e = ready.export
        self.export = e
        self.flags = ready.flags
        self.size = e.size
        self.alignment = max(1, e.min_block)
        self.max_payload = max(self.alignment, min(e.max_payload, P.MAX_PAYLOAD))
        self.max_payload -= self.max_payload % self.alignment
        self.server_read_only = bool(ready.flags & P.TF_READ_ONLY)
        self._contexts = dict(ready.contexts)
        self._map = (0, [])  # the last block status answer, for walks by seek_data / seek_hole
        self._deferred = []  # requests submitted by the receiving thread, sent by _sender
        self._deferred_cond = threading.Condition()
        self._sender = None
        self._stop_sender = False
        self._thread = threading.Thread(target=self._receive, name=f"nbd-client {uri}", daemon=True)
        try:
            self._thread.start()
        except BaseException:
            self._sock.close()
            raise
        self._receiver = self._thread.ident

    # -- handshake ---------------------------------------------------------------------------------
    def _handshake(self, timeout):
        proto, sock = self._proto, self._sock
        sock.settimeout(timeout)
        try:
            while True:
                ev = proto.next_event()
                out = proto.data_to_send()
                if out:
                    sock.sendall(out)
                if isinstance(ev, P.Ready):
                    return ev
                if isinstance(ev, P.Refused):
                    code = errno.ENOENT if ev.reply_type == P.ERR_UNKNOWN else errno.EPROTO
                    raise OSError(
                        code,
                        f"the NBD server refused export {self.address.export!r}"
                        + (f": {ev.message}" if ev.message else ""),
                        self.path,
                    )
                if ev is P.CLOSED:
                    raise OSError(
                        errno.ECONNRESET,
                        "the NBD server closed the connection during the handshake",
                        self.path,
                    )
                proto.receive_data(sock.recv(1 << 16))
        except P.RemoteProtocolError as exc:
            raise OSError(errno.EPROTO, f"NBD handshake failed: {exc}", self.path) from None
        except TimeoutError:
            raise OSError(errno.ETIMEDOUT, "the NBD handshake timed out", self.path) from None
        finally:
            sock.settimeout(None)

    # -- properties --------------------------------------------------------------------------------
    @property
    def closed(self):
        return self._closed

    def alloc(self, length):
        return memoryview(bytearray(length))

    def inflight(self):
        with self._lock:
            return len(self._futures)

    # -- requests ----------------------------------------------------------------------------------
    def _start(self, kind, op, offset=0, length=0, flags=0, data=None, buffer=None, result=None):
        """Send one request; its future completes with ``result`` (or the reply, for block
        status) when the server answers."""
        fut = Future()
        with self._lock:
            if self._dead is not None:
                return failed(self._dead_error(op, offset))
            if self._closed:
                return failed(OSError(errno.EBADF, f"{op} on a closed NBD connection", self.path))
            self._cookie += 1
            cookie = self._cookie
            self._futures[cookie] = (fut, op, offset, result)
            bufs = self._proto.request(
                kind, cookie, offset, length, flags, data=data, buffer=buffer
            )
        self._send(bufs)
        return fut

    def _send(self, bufs):
        if threading.get_ident() == self._receiver:
            # A completion callback submitting more: the receiving thread must never block in a
            # send (a server that waits for us to read its replies before it reads our requests
            # would then wait for ever), so the sending thread takes these.
            with self._deferred_cond:
                self._deferred.append(bufs)
                if self._sender is None:
                    self._sender = threading.Thread(
                        target=self._send_deferred, daemon=True, name=f"nbd-client-send {self.path}"
                    )
                    self._sender.start()
                self._deferred_cond.notify()
            return
        self._send_now(bufs)

    def _send_deferred(self):
        while True:
            with self._deferred_cond:
                while not self._deferred and not self._stop_sender:
                    self._deferred_cond.wait()
                if not self._deferred:
                    return
                batch, self._deferred = self._deferred, []
            for bufs in batch:
                self._send_now(bufs)

    def _send_now(self, bufs):
        try:
            with self._send_lock:
                views = [memoryview(b).cast("B") for b in bufs if len(b)]
                while views:
                    n = self._sock.sendmsg(views)
                    while views and n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    if n:
                        views[0] = views[0][n:]
        except OSError as exc:
            self._fail_all(f"sending to the NBD server failed: {exc.strerror or exc}")

    def _dead_error(self, op, offset):
        return OSError(errno.ECONNRESET, f"{op} at offset {offset}: {self._dead}", self.path)

    def _chunks(self, offset, length):
        step = self.max_payload
        return [(o, min(step, offset + length - o)) for o in range(offset, offset + length, step)]

    def submit_read(self, offset, buffers):
        """Read into ``buffers`` (filled in order) at ``offset``; result: bytes read."""
        views = [memoryview(b).cast("B") for b in buffers]
        total = sum(len(v) for v in views)
        if not total:
            return completed(0)
        if len(views) == 1:
            if total <= self.max_payload:  # the common case: one request, no copy
                return self._start(P.Cmd.READ, "read", offset, total, buffer=views[0], result=total)
            target, scatter = views[0], None
        else:
            target, scatter = memoryview(bytearray(total)), views

        def finish(_):
            if scatter is not None:
                pos = 0
                for v in scatter:
                    v[:] = target[pos : pos + len(v)]
                    pos += len(v)
            return total

        futs = [
            self._start(P.Cmd.READ, "read", o, n, buffer=target[o - offset : o - offset + n])
            for o, n in self._chunks(offset, total)
        ]
        return _then(futs[0] if len(futs) == 1 else join(futs), finish)

    def submit_write(self, offset, buffers):
        """Write ``buffers`` (in order) at ``offset``; result: bytes written."""
        if self.read_only:
            return failed(
                OSError(errno.EBADF, "write on an NBD export opened read-only", self.path)
            )
        self._map = (0, [])  # allocation may change
        views = [memoryview(b).cast("B") for b in buffers]
        data = views[0] if len(views) == 1 else memoryview(b"".join(views))
        total = len(data)
        if not total:
            return completed(0)
        if total <= self.max_payload:
            return self._start(P.Cmd.WRITE, "write", offset, total, data=data, result=total)
        futs = [
            self._start(P.Cmd.WRITE, "write", o, n, data=data[o - offset : o - offset + n])
            for o, n in self._chunks(offset, total)
        ]
        return _then(futs[0] if len(futs) == 1 else join(futs), lambda _: total)

    def submit_flush(self):
        if self.read_only or not self.flags & P.TF_SEND_FLUSH:
            return completed(None)
        return self._start(P.Cmd.FLUSH, "flush")

    def _ranged(self, kind, op, flag, offset, length, flags=0):
        if self.read_only:
            return failed(
                OSError(errno.EBADF, f"{op} on an NBD export opened read-only", self.path)
            )
        if not self.flags & flag:
            return failed(
                OSError(errno.EOPNOTSUPP, f"the NBD export does not support {op}", self.path)
            )
        if not length:
            return completed(None)
        self._map = (0, [])  # allocation may change
        step = 1 << 30  # well inside the u32 length field
        futs = [
            self._start(kind, op, o, min(step, offset + length - o), flags)
            for o in range(offset, offset + length, step)
        ]
        return _then(futs[0] if len(futs) == 1 else join(futs), lambda _: None)

    def submit_discard(self, offset, length):
        return self._ranged(P.Cmd.TRIM, "discard", P.TF_SEND_TRIM, offset, length)

    def submit_zero_range(self, offset, length, unmap=False):
        flags = 0 if unmap else P.CMD_FLAG_NO_HOLE
        return self._ranged(
            P.Cmd.WRITE_ZEROES, "zero range", P.TF_SEND_WRITE_ZEROES, offset, length, flags
        )

    # -- synchronous forms -------------------------------------------------------------------------
    def pread(self, buf, offset):
        return self.submit_read(offset, [buf]).result()

    def preadv(self, buffers, offset):
        return self.submit_read(offset, buffers).result()

    def pwrite(self, buf, offset):
        return self.submit_write(offset, [buf]).result()

    def pwritev(self, buffers, offset):
        return self.submit_write(offset, buffers).result()

    def flush(self):
        self.submit_flush().result()

    def discard(self, offset, length):
        self.submit_discard(offset, length).result()

    def zero_range(self, offset, length, unmap=False):
        self.submit_zero_range(offset, length, unmap).result()

    def start_writeback(self, offset=0, length=0):
        """Nothing to do: the server owns its cache."""

    def truncate(self, size):
        raise OSError(errno.EOPNOTSUPP, "an NBD export cannot be resized", self.path)

    def allocate(self, offset, length):
        raise OSError(errno.EOPNOTSUPP, "an NBD export cannot grow or allocate", self.path)

    # -- block status ------------------------------------------------------------------------------
    def block_status(self, offset, length):
        """(length, flags) extents from ``offset`` (``base:allocation`` flags; (length, 0), data,
        when the server has no such context). Covers at least one byte; may stop short."""
        length = min(length, self.size - offset, 0xFFFFFFFF - 0xFFFFFFFF % max(self.alignment, 512))
        if length <= 0:
            return []
        if not self._contexts:
            return [(length, 0)]
        fut = self._start(P.Cmd.BLOCK_STATUS, "block status", offset, length)
        reply = fut.result()
        (cid,) = [k for k, v in self._contexts.items() if v == P.BASE_ALLOCATION][:1]
        return list((reply.extents or {}).get(cid, ())) or [(length, 0)]

    def _seek(self, offset, want_zero):
        pos = offset
        while pos < self.size:
            start, extents = self._map
            if not start <= pos < start + sum(n for n, _ in extents):
                start, extents = self._map = (pos, self.block_status(pos, self.size - pos))
            at = start
            for n, flags in extents:
                if at + n > pos:
                    if bool(flags & P.STATE_ZERO) == want_zero:
                        return max(at, pos)
                    pos = at + n
                at += n
        return None

    def seek_data(self, offset):
        """Offset of the first byte at or after ``offset`` that may not read as zero, or None."""
        return self._seek(offset, False)

    def seek_hole(self, offset):
        """Offset of the first byte at or after ``offset`` that reads as zero (the end counts)."""
        found = self._seek(offset, True)
        return self.size if found is None else found

    # -- batches -----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def batch(self):
        """Requests are sent as they are submitted: a batch changes nothing."""
        yield self

    def push(self):
        """Nothing is held back (see ``batch``)."""

    # -- the receiving thread ----------------------------------------------------------------------
    def _receive(self):
        proto, sock = self._proto, self._sock
        reason = "the NBD server closed the connection"
        scratch = bytearray(_RECV_BYTES)
        view = memoryview(scratch)
        try:
            while True:
                try:
                    data = view[: sock.recv_into(scratch)]
                except OSError as exc:
                    reason = f"the NBD connection failed: {exc.strerror or exc}"
                    data = b""
                while True:
                    with self._lock:  # the core's table of requests is shared with submitters
                        if data is not None:
                            proto.receive_data(data)  # copied: the scratch buffer is reused
                            data = None
                        ev = proto.next_event()
                        if isinstance(ev, P.Reply):
                            entry = self._futures.pop(ev.cookie)
                            if not self._futures:
                                self._idle.notify_all()
                    if ev is P.NEED_DATA:
                        break
                    if ev is P.CLOSED:
                        return
                    self._complete(ev, *entry)
        except P.RemoteProtocolError as exc:
            reason = f"the NBD server broke the protocol: {exc}"
        except Exception as exc:  # a bug: fail the requests rather than hang them
            _log.exception("nbd client %s: receiving thread failed", self.path)
            reason = f"the NBD client failed: {exc}"
        finally:
            self._fail_all(reason if not self._closed else "the NBD connection was closed")

    def _complete(self, reply, fut, op, offset, result):
        if reply.error:
            code = P.host_errno(reply.error)
            msg = f"{op} at offset {offset}: {os.strerror(code)}"
            if reply.message:
                msg += f" (server: {reply.message})"
            fut.set_exception(OSError(code, msg, self.path))
        elif reply.kind == P.Cmd.BLOCK_STATUS:
            fut.set_result(reply)
        else:
            fut.set_result(result)

    def _fail_all(self, reason):
        with self._lock:
            if self._dead is None:
                self._dead = reason
            pending, self._futures = self._futures, {}
            self._idle.notify_all()
        for fut, op, offset, _ in pending.values():
            fut.set_exception(
                OSError(errno.ECONNRESET, f"{op} at offset {offset}: {reason}", self.path)
            )

    # -- lifetime ----------------------------------------------------------------------------------
    def close(self):
        """Wait for requests in flight, send DISC, close. Idempotent."""
        with self._lock:
            if self._closed:
                return
            while self._futures and self._dead is None:
                self._idle.wait()
            self._closed = True
            alive = self._dead is None
        if alive:
            try:
                self._send(self._proto.request(P.Cmd.DISC, 0))
                self._sock.shutdown(socket.SHUT_WR)
            except (OSError, P.LocalProtocolError):
                pass
        self._thread.join(30)
        with self._deferred_cond:
            self._stop_sender = True
            self._deferred_cond.notify()
        if self._sender is not None:
            self._sender.join(30)
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<NbdFile {self.path!r} size={self.size}{' closed' if self._closed else ''}>"


def _then(fut, fn):
    """A future for ``fn(result)`` once ``fut`` succeeds; failures pass through."""
    out = Future()

    def done(f):
        exc = f.exception()
        if exc is not None:
            out.set_exception(exc)
        else:
            try:
                out.set_result(fn(f.result()))
            except BaseException as e:  # a caller buffer resized under us
                out.set_exception(e)

    fut.add_done_callback(done)
    return out

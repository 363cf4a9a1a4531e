"""The NBD server: sockets and threads around ``protocol.ServerConnection``, requests served by
one open ``vblock`` ``Image``.

Threads. The caller of :meth:`Server.serve_forever` accepts connections (at most ``shared`` at
once; further clients wait in the listen backlog, as with ``qemu-nbd -e``). Each connection has
one receiving thread that reads the socket, feeds the protocol core and submits each command to
the image at once, without waiting for earlier ones: many requests are in flight, and their
replies go out in completion order from whichever thread completes them (an engine or driver
thread), under the connection's send lock. BLOCK_STATUS runs in the receiving thread
(``Image.block_status`` is synchronous).

Requests go through the block layer like every other user's: ``Image.submit_*`` checks, bounces
and serves them; its errors become NBD errors (``protocol.nbd_errno``). Block status maps DATA to
0 and ZERO (holes, zero clusters, unallocated ranges) to HOLE|ZERO, as QEMU does.

Every connection of an export uses the same ``Image`` and FLUSH flushes it, so CAN_MULTI_CONN is
advertised whenever more than one connection is allowed.

Ending. A client's DISC, end of file or protocol violation ends its connection: requests in
flight finish and are answered (where the socket still works), the image is flushed, the socket
closed. :meth:`Server.stop` (signal-safe) stops accepting and ends every connection that way;
``serve_forever`` returns when all are gone. The caller then closes the image (a QED image is
left clean). A client that does not finish its handshake within ``handshake_timeout`` seconds,
or stops reading its replies for ``send_timeout`` seconds, is dropped; nothing a client sends
can make the server write outside the image or raise out of a thread.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import selectors
import socket
import struct
import threading

from vblock.errors import ReadOnlyError
from vblock.future import followed_by
from vblock.hostio import alloc_buffer
from vblock.listen import listen_tcp, listen_unix
from vblock.nbd import protocol as P
from vblock.nbd.uri import NbdAddress, parse_address

__all__ = ["Server", "listen"]

_log = logging.getLogger(__name__)

_RECV_BYTES = 1 << 18
_BLOCK_STATUS_MAX = 1 << 30  # bytes one BLOCK_STATUS answer looks at (the rest: ask again)
SEND_TIMEOUT = 30  # seconds a reply may wait for a client that does not read
HANDSHAKE_TIMEOUT = 10  # seconds a client has to finish the handshake (QEMU's limit too)


def listen(address: NbdAddress, backlog: int = 16) -> socket.socket:
    """A listening socket for ``address``: a unix socket (a stale socket file is replaced; a live
    one or another kind of file is an error) or TCP (SO_REUSEADDR); see ``vblock.listen``."""
    if address.socket is not None:
        return listen_unix(address.socket, backlog)
    return listen_tcp(address.host, address.port, backlog)


def _nbd_error(exc) -> tuple:
    """(NBD errno, message) for an exception from the block layer."""
    if isinstance(exc, ReadOnlyError):
        return P.NBD_EPERM, str(exc)
    if isinstance(exc, OSError) and exc.errno is not None:
        return P.nbd_errno(exc.errno), os.strerror(exc.errno)
    if isinstance(exc, ValueError):
        return P.NBD_EINVAL, str(exc)
    return P.NBD_EIO, f"{type(exc).__name__}: {exc}"


class _Buffers:
    """Page-aligned buffers for one connection's payloads, reused by length (a workload of
    8 KiB requests then maps no memory per request). Thread-safe; keeps at most ``keep`` idle
    buffers of each length, and none over ``largest`` bytes."""

    def __init__(self, keep=64, largest=1 << 20):
        self._free = {}
        self._lock = threading.Lock()
        self._keep = keep
        self._largest = largest

    def get(self, length):
        with self._lock:
            free = self._free.get(length)
            if free:
                return free.pop()
        return alloc_buffer(length)

    def put(self, buf):
        n = len(buf)
        if n > self._largest:
            return
        with self._lock:
            free = self._free.setdefault(n, [])
            if len(free) < self._keep:
                free.append(buf)


class _Connection:
    """One client: its socket, protocol core, receiving thread and requests in flight."""

    def __init__(self, server, sock, number):
        self.server = server
        self.sock = sock
        self.number = number
        self.buffers = _Buffers()
        self.proto = P.ServerConnection([server.export], alloc=self.buffers.get)
        self._send_lock = threading.Lock()
        self._cond = threading.Condition()
        self._in_flight = 0
        self._broken = False  # the socket failed: replies are dropped
        self.thread = threading.Thread(target=self._run, name=f"nbd-conn-{number}", daemon=True)

    # -- sending ---------------------------------------------------------------------------------
    def send(self, buffers):
        if self._broken:
            return
        with self._send_lock:
            try:
                views = [memoryview(b).cast("B") for b in buffers if len(b)]
                while views:
                    n = self.sock.sendmsg(views)
                    while views and n >= len(views[0]):
                        n -= len(views[0])
                        views.pop(0)
                    if n:
                        views[0] = views[0][n:]
            except OSError as exc:  # the client went away (EPIPE, ECONNRESET), or stopped reading
                self._broken = True
                _log.info("nbd: connection %d: send failed: %s", self.number, exc)
                try:
                    self.sock.shutdown(socket.SHUT_RDWR)  # the receiving thread ends too
                except OSError:
                    pass

    # -- requests --------------------------------------------------------------------------------
    def _begin(self):
        with self._cond:
            self._in_flight += 1

    def _end(self):
        with self._cond:
            self._in_flight -= 1
            if not self._in_flight:
                self._cond.notify_all()

    def _answer(self, cmd, fut, buf=None):
        """Reply to ``cmd`` when ``fut`` completes; ``buf`` (a READ's data or a WRITE's payload)
        goes back to the pool once the reply is sent."""

        def done(f):
            try:
                exc = f._exc
                if exc is not None:
                    self.send(self.proto.reply(cmd, *_nbd_error(exc)))
                elif cmd.kind == P.Cmd.READ:
                    self.send(self.proto.reply_read(cmd, buf))
                else:
                    self.send(self.proto.reply(cmd))
            finally:
                if buf is not None:
                    self.buffers.put(buf)
                self._end()

        fut.add_done_callback(done)

    def _serve(self, cmd):
        img = self.server.image
        if cmd.error:
            self.send(self.proto.reply(cmd, cmd.error, cmd.message))
            return
        kind = cmd.kind
        self._begin()
        try:
            if kind == P.Cmd.READ:
                buf = self.buffers.get(cmd.length)
                self._answer(cmd, img.submit_read(cmd.offset, [buf]), buf)
            elif kind == P.Cmd.WRITE:
                data = cmd.data
                self._answer(cmd, img.submit_write(cmd.offset, [data], cmd.fua), data)
            elif kind == P.Cmd.FLUSH:
                self._answer(cmd, img.submit_flush())
            elif kind == P.Cmd.TRIM:
                self._answer(cmd, self._fua(cmd, img.submit_discard(cmd.offset, cmd.length)))
            elif kind == P.Cmd.WRITE_ZEROES:
                may_unmap = not cmd.flags & P.CMD_FLAG_NO_HOLE
                fut = img.submit_write_zeroes(cmd.offset, cmd.length, may_unmap)
                self._answer(cmd, self._fua(cmd, fut))
            elif kind == P.Cmd.BLOCK_STATUS:
                length = min(cmd.length, _BLOCK_STATUS_MAX)
                runs = img.block_status(cmd.offset, length)
                self.send(
                    self.proto.reply_block_status(cmd, [(r.length, _state(r.kind)) for r in runs])
                )
                self._end()
            else:  # CACHE: a hint this server has no use for
                self.send(self.proto.reply(cmd))
                self._end()
        except Exception as exc:  # refused at submission (range, read-only) or a host failure
            self.send(self.proto.reply(cmd, *_nbd_error(exc)))
            self._end()

    def _fua(self, cmd, fut):
        return followed_by(fut, self.server.image.submit_flush) if cmd.fua else fut

    # -- the receiving thread ----------------------------------------------------------------------
    def _run(self):
        try:
            self._receive()
        except Exception:  # a bug: keep the server alive, drop this client
            _log.exception("nbd: connection %d failed", self.number)
        finally:
            with self._cond:
                while self._in_flight:
                    self._cond.wait()
            try:
                if self.proto.export is not None and not self.server.image.read_only:
                    self.server.image.flush()
            except Exception as exc:
                _log.warning("nbd: flush after connection %d: %s", self.number, exc)
            try:
                self.sock.close()
            except OSError:
                pass
            self.server._gone(self)

    def _receive(self):
        proto = self.proto
        sock = self.sock
        scratch = bytearray(_RECV_BYTES)
        view = memoryview(scratch)
        limit = self.server.handshake_timeout
        sock.settimeout(limit)  # a silent client must not hold a connection slot
        self.send([proto.data_to_send()])
        while True:
            try:
                n = sock.recv_into(scratch)
            except TimeoutError:
                _log.warning(
                    "nbd: connection %d: no handshake within %s s, dropping it", self.number, limit
                )
                return
            except OSError as exc:
                _log.info("nbd: connection %d: receive failed: %s", self.number, exc)
                n = 0
            data = view[:n]
            proto.receive_data(data)
            while True:
                try:
                    ev = proto.next_event()
                except P.RemoteProtocolError as exc:
                    _log.warning(
                        "nbd: connection %d: protocol error, dropping it: %s", self.number, exc
                    )
                    self.send([proto.data_to_send()])
                    return
                if ev.__class__ is P.Command:
                    self._serve(ev)
                    if ev.fatal:
                        return
                    continue
                if ev is P.NEED_DATA:
                    break
                if ev is P.CLOSED or isinstance(ev, P.Disconnect):
                    self.send([proto.data_to_send()])
                    return
                if isinstance(ev, P.Ready):
                    self.send([proto.data_to_send()])
                    sock.settimeout(
                        None
                    )  # transmission: a client may be idle for as long as it likes
            out = proto.data_to_send()
            if out:
                self.send([out])
            if not data:
                return

    def shutdown(self):
        """Stop reading (the receiving thread then drains and closes)."""
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass


def _state(kind):
    from vblock.block.interface import DATA

    return 0 if kind == DATA else P.STATE_HOLE | P.STATE_ZERO


class Server:
    """``Server(address, image, export_name="", read_only=None, shared=1, description="",
    handshake_timeout=HANDSHAKE_TIMEOUT, send_timeout=SEND_TIMEOUT)`` (seconds).

    ``address``: an ``NbdAddress`` or a string (a unix socket path, anything with ``/``, or
    ``HOST:PORT``); ``address`` then holds the port bound (``HOST:0``: any free one). Binds at
    construction; ``serve_forever()`` runs until :meth:`stop`; the image is the caller's to
    close. ``read_only=None`` follows the image. ``shared``: connections at once (0: no limit).
    """

    def __init__(
        self,
        address,
        image,
        export_name="",
        read_only=None,
        shared=1,
        description="",
        handshake_timeout=HANDSHAKE_TIMEOUT,
        send_timeout=SEND_TIMEOUT,
    ):
        self.handshake_timeout = handshake_timeout
        self.send_timeout = send_timeout
        self.address = parse_address(address) if isinstance(address, str) else address
        self.image = image
        if shared < 0:
            raise ValueError(f"shared must be >= 0, not {shared}")
        self.shared = shared
        ro = image.read_only if read_only is None else bool(read_only) or image.read_only
        self.export = P.Export(
            export_name, image.size, read_only=ro, multi_conn=shared != 1, description=description
        )
        self.connections = 0  # clients served so far
        self._live = set()
        self._lock = threading.Lock()
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            self.listener = listen(self.address)
        except BaseException:
            os.close(self._wake_r)
            os.close(self._wake_w)
            raise
        if self.address.socket is None:  # the port really bound (port 0 asks for any free one)
            self.address = dataclasses.replace(self.address, port=self.listener.getsockname()[1])

    def stop(self):
        """Ask the server to finish (signal-handler safe: a flag store and a pipe write)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _gone(self, conn):
        with self._lock:
            self._live.discard(conn)
        try:
            os.write(self._wake_w, b"c")
        except OSError:
            pass

    def serve_forever(self):
        """Serve clients until :meth:`stop`; returns once every connection has ended."""
        sel = selectors.DefaultSelector()
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        listening = False
        try:
            while not self._stopping:
                with self._lock:
                    room = not self.shared or len(self._live) < self.shared
                if room and not listening:
                    sel.register(self.listener, selectors.EVENT_READ, "listen")
                    listening = True
                elif not room and listening:
                    sel.unregister(self.listener)
                    listening = False
                for key, _ in sel.select():
                    if key.data == "wake":
                        try:
                            while os.read(self._wake_r, 256):
                                pass
                        except BlockingIOError:
                            pass
                    elif not self._stopping:
                        self._accept()
        finally:
            sel.close()
            self._close_listener()
            with self._lock:
                live = list(self._live)
            for c in live:
                c.shutdown()
            for c in live:
                c.thread.join()
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _accept(self):
        try:
            sock, _ = self.listener.accept()
        except OSError as exc:
            _log.warning("nbd: accept failed: %s", exc)
            return
        conn = None
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # Replies are sent from the threads that complete requests: a client that stops
            # reading must not hold them for long. A send that makes no progress for send_timeout
            # seconds fails, and the connection is dropped (the socket stays blocking for
            # receives).
            secs = self.send_timeout
            sock.setsockopt(
                socket.SOL_SOCKET,
                socket.SO_SNDTIMEO,
                struct.pack("ll", int(secs), int(secs % 1 * 1e6)),
            )
            self.connections += 1
            conn = _Connection(self, sock, self.connections)
            with self._lock:
                self._live.add(conn)
            _log.info("nbd: client %d connected", conn.number)
            conn.thread.start()
        except Exception as exc:  # the connection never got its thread: nobody else closes it
            _log.warning("nbd: cannot serve a new client: %s", exc)
            if conn is not None:
                with self._lock:
                    self._live.discard(conn)
            sock.close()

    def _close_listener(self):
        if self.listener is None:
            return
        self.listener.close()
        self.listener = None
        if self.address.socket is not None:
            try:
                os.unlink(self.address.socket)
            except FileNotFoundError:
                pass

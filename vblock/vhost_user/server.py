"""The vhost-user server: a unix socket, SCM_RIGHTS fds, mmap, eventfds - the I/O rim around
``protocol.Connection`` (decisions) and ``backend.VhostUserBlk`` (the device).

One loop thread (the caller of :meth:`Server.serve_forever`) owns everything except completions:
it accepts one front-end at a time, reads its messages, answers them, and reads the rings' kick
eventfds, calling the device's queue processing for each kick. Completions arrive on the block
layer's threads and write the call eventfds (``signal``). When the front-end disconnects, the
requests in flight finish, the image is flushed and the server waits for the next front-end.
:meth:`Server.stop` (from a signal handler or another thread) wakes the loop, which then drains,
flushes, closes the image and removes the socket file.
"""

from __future__ import annotations

import array
import errno
import logging
import mmap
import os
import selectors
import socket
import stat
import threading

from vblock.vhost_user import protocol as P
from vblock.vhost_user.backend import Refused, VhostUserBlk

__all__ = ["Server", "bind_unix"]

_log = logging.getLogger(__name__)

_RECV_BYTES = 1 << 16
_CMSG_SPACE = socket.CMSG_SPACE(P.MAX_FDS * 4)
_EVENTFD_ONE = (1).to_bytes(8, "little")


def bind_unix(path):
    """A listening unix socket at ``path``. A stale socket file (nobody accepts on it) is replaced;
    a live one, or any other kind of file, is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # stale: nobody listens
        else:
            raise OSError(errno.EADDRINUSE, "another server is listening on it", path)
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(1)
    except OSError as exc:
        sock.close()
        raise type(exc)(exc.errno, exc.strerror, path) from None  # name the socket path
    except BaseException:
        sock.close()
        raise
    return sock


class _Host:
    """What the back-end asks of the rim: mappings, eventfd writes, kick watching."""

    def __init__(self, server):
        self._server = server

    @staticmethod
    def map_region(fd, offset, size):
        gran = mmap.ALLOCATIONGRANULARITY
        base = offset - offset % gran
        m = mmap.mmap(fd, size + offset - base, flags=mmap.MAP_SHARED,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=base)
        return memoryview(m)[offset - base :]

    @staticmethod
    def signal(fd):
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the front-end has a notification pending anyway
        except OSError as exc:
            _log.debug("vhost-user: eventfd write failed: %s", exc)

    def watch_kick(self, index, fd):
        self._server._watch_kick(index, fd)

    def unwatch_kick(self, index):
        self._server._unwatch_kick(index)


class Server:
    """``Server(path, image, num_queues=1, serial="vblock0", read_only=None, writeback=True)``.

    Binds at construction (so the socket exists when the constructor returns); ``serve_forever()``
    runs until :meth:`stop`; the image is closed by the caller. ``path=None`` binds nothing (use
    :meth:`serve_connection` with a socket of your own).
    """

    def __init__(self, path, image, num_queues=1, serial="vblock0", read_only=None, writeback=True):
        self.path = path
        self.image = image
        self.backend = VhostUserBlk(image, _Host(self), num_queues=num_queues, serial=serial,
                                    read_only=read_only, writeback=writeback)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._kicks = {}  # index -> fd
        self.connections = 0  # front-ends served so far
        self._lock = threading.Lock()
        self._sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        self.listener = bind_unix(path) if path is not None else None

    # -- control --------------------------------------------------------------------------------
    def stop(self):
        """Ask the loop to finish (signal-handler safe: one flag store and one pipe write)."""
        self._stopping = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    @property
    def wakeup_fd(self):
        """For ``signal.set_wakeup_fd``: a signal then wakes the loop even mid-select."""
        return self._wake_w

    # -- kick watching (loop thread) --------------------------------------------------------------
    def _watch_kick(self, index, fd):
        self._unwatch_kick(index)
        self._kicks[index] = fd
        self._sel.register(fd, selectors.EVENT_READ, ("kick", index))

    def _unwatch_kick(self, index):
        fd = self._kicks.pop(index, None)
        if fd is not None:
            try:
                self._sel.unregister(fd)
            except (KeyError, ValueError):
                pass

    # -- the loop ---------------------------------------------------------------------------------
    def serve_forever(self):
        """Accept front-ends one after another until :meth:`stop`; then :meth:`close`."""
        sel = self._sel
        sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    kind, _ = key.data
                    if kind == "wake":
                        _drain_pipe(self._wake_r)
                    elif kind == "listen":
                        self._accept()
                    if self._stopping:
                        break
        finally:
            self.close()

    def _accept(self):
        try:
            conn, _ = self.listener.accept()
        except OSError as exc:
            _log.warning("vhost-user: accept failed: %s", exc)
            return
        self.connections += 1
        _log.info("vhost-user: front-end connected")
        sel = self._sel
        sel.unregister(self.listener)  # one front-end at a time
        try:
            self.serve_connection(conn)
        finally:
            conn.close()
            sel.register(self.listener, selectors.EVENT_READ, ("listen", None))
            _log.info("vhost-user: front-end gone; waiting for the next one")

    def serve_connection(self, conn):
        """Serve one connected front-end (any connected stream socket: tests pass one end of a
        ``socketpair``) until it disconnects, breaks the protocol, or :meth:`stop` is called.
        Returns after its requests in flight finished and the image was flushed."""
        sel = self._sel
        proto = self.backend.new_connection()
        sel.register(conn, selectors.EVENT_READ, ("conn", None))
        try:
            while not self._stopping:
                for key, _ in sel.select():
                    kind, index = key.data
                    if kind == "kick":
                        if self._read_kick(key.fd):
                            self.backend.kick(index)
                    elif kind == "conn":
                        if not self._read_messages(conn, proto):
                            return
                    elif kind == "wake":
                        _drain_pipe(self._wake_r)
                    if self._stopping:
                        return
        finally:
            sel.unregister(conn)
            for index in list(self._kicks):
                self._unwatch_kick(index)
            try:
                self.backend.disconnect()
            finally:
                _close_quietly(proto.pending_fds())

    @staticmethod
    def _read_kick(fd):
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return False
        except OSError:
            return False
        return True

    def _read_messages(self, conn, proto):
        """Read what the socket has, handle every whole message; False once the peer is gone."""
        try:
            data, fds = _recv_with_fds(conn)
        except ConnectionError:
            data, fds = b"", []
        proto.receive_data(data, fds)
        while True:
            try:
                req = proto.next_event()
            except P.RemoteProtocolError as exc:
                _log.error("vhost-user: protocol error, dropping the front-end: %s", exc)
                return False
            if req is P.NEED_DATA:
                return True
            if req is P.CLOSED:
                return False
            try:
                value = self.backend.handle(req)
                out = proto.respond(req, value)
            except Refused as exc:
                _log.warning("vhost-user: %s", exc)
                out = proto.refuse(req)
            except Exception:  # a bug of ours: drop this front-end, keep serving the next
                _log.exception("vhost-user: internal error handling request %s; dropping the front-end", req.code)
                return False
            if out:
                try:
                    conn.sendall(out)
                except OSError:
                    return False

    def close(self):
        """Stop serving: unlink the socket (the image stays open for the caller to close)."""
        with self._lock:
            if self._sel is None:
                return
            try:
                self._sel.close()
            except Exception:
                pass
            self._sel = None
            if self.listener is not None:
                self.listener.close()
                self.listener = None
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
            for fd in (self._wake_r, self._wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


def _recv_with_fds(sock):
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(_RECV_BYTES, _CMSG_SPACE)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return data, list(fds)


def _drain_pipe(fd):
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _close_quietly(fds):
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass

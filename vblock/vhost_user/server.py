"""The vhost-user server: a unix socket, SCM_RIGHTS fds, mmap, eventfds - the I/O rim around
``protocol.Connection`` (decisions) and ``backend.VhostUserBlk`` (the device).

One loop thread (the caller of :meth:`Server.serve_forever`) owns everything except completions:
it accepts one front-end at a time, reads its messages, answers them, and reads the rings' kick
eventfds, calling the device's queue processing for each kick. Completions arrive on the block
layer's threads and write the call eventfds (``signal``). When the front-end disconnects, the
requests in flight finish, the image is flushed and the server waits for the next front-end.
:meth:`Server.stop` (from a signal handler or another thread) wakes the loop, which then drains,
flushes, closes the image and removes the socket file.

A front-end is not trusted to be well-behaved; nothing it does may crash, hang or exhaust the server:

* every fd received is made non-blocking and close-on-exec at once, and every fd a message carries
  is consumed or closed (``protocol.Connection``); a message whose ancillary data was truncated
  (``MSG_CTRUNC``: more fds than ``protocol.MAX_FDS``) drops the front-end, its fds closed;
* writes to call and err eventfds never block: a saturated counter (EAGAIN) already has a
  notification pending, which is all a write would add;
* replies are sent without blocking the loop: :meth:`Server.stop` still ends a session whose
  front-end does not read, and a reply that cannot be sent within ``idle_timeout`` drops it; so does
  a message left incomplete for ``idle_timeout`` seconds;
* guest memory that could shrink under the server is refused at SET_MEM_TABLE / ADD_MEM_REG
  (:func:`check_backing`): an access past the end of a shrunk mapping would kill the server with
  SIGBUS. A memfd must carry ``F_SEAL_SHRINK`` (QEMU's ``memory-backend-memfd`` seals by default);
  any other file must be a regular file that holds the whole region at mapping time. Such a file
  (``memory-backend-file``, e.g. on hugetlbfs or /dev/shm) could still be truncated later by
  whoever can write it: it is trusted, as QEMU's own guest RAM file is;
* a kick fd that reaches end of file or fails to read stops being watched (the ring waits for a
  new one and the err fd fires) instead of spinning the loop; an fd that cannot be watched at all
  is refused at SET_VRING_KICK. OS errors from mapping or watching become failed replies.
"""

from __future__ import annotations

import array
import fcntl
import logging
import mmap
import os
import select
import selectors
import socket
import stat
import threading
import time

from vblock.listen import listen_unix
from vblock.vhost_user import protocol as P
from vblock.vhost_user.backend import Refused, VhostUserBlk

__all__ = ["Server", "bind_unix", "check_backing"]

_log = logging.getLogger(__name__)

_RECV_BYTES = 1 << 16
_CMSG_SPACE = socket.CMSG_SPACE(P.MAX_FDS * 4)
_EVENTFD_ONE = (1).to_bytes(8, "little")
IDLE_TIMEOUT = 30.0  # seconds a front-end may leave a message half-sent, or a reply unread
_F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
_F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x0002)


def check_backing(fd, offset, size):
    """Raise ``Refused`` unless ``[offset, offset + size)`` of ``fd`` is guest memory that cannot
    shrink under a mapping (module docstring): a regular file holding the whole range, and for a
    memfd one sealed with ``F_SEAL_SHRINK``. ``OSError`` if ``fd`` cannot even be examined."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Refused(f"guest memory fd is not a regular file or memfd (mode {st.st_mode:#o})")
    if st.st_size < offset + size:
        raise Refused(
            f"guest memory file of {st.st_size} bytes is smaller than offset {offset:#x} + size {size:#x}"
        )
    try:
        name = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        name = ""
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        seals = 0  # a file system without seals: a plain file
    if name.startswith("/memfd:") and not seals & _F_SEAL_SHRINK:
        raise Refused("guest memory memfd is not sealed against shrinking (F_SEAL_SHRINK)")


def bind_unix(path):
    """A listening unix socket at ``path``; a stale socket file is replaced, a live one or any
    other kind of file is an error (``vblock.listen.listen_unix``)."""
    return listen_unix(path, 1)


class _Host:
    """What the back-end asks of the rim: mappings, eventfd writes, kick watching."""

    def __init__(self, server):
        self._server = server
        self._probe = select.epoll()  # check_kick's trial registrations
        os.set_inheritable(self._probe.fileno(), False)

    @staticmethod
    def map_region(fd, offset, size):
        check_backing(fd, offset, size)
        gran = mmap.ALLOCATIONGRANULARITY
        base = offset - offset % gran
        m = mmap.mmap(
            fd,
            size + offset - base,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
            offset=base,
        )
        return memoryview(m)[offset - base :]

    @staticmethod
    def signal(fd):
        try:
            os.write(fd, _EVENTFD_ONE)
        except BlockingIOError:
            pass  # the counter is saturated: the front-end has a notification pending anyway
        except OSError as exc:
            _log.debug("vhost-user: eventfd write failed: %s", exc)

    def check_kick(self, fd):
        """``Refused`` if ``fd`` cannot be watched for reading (a regular file, a closed fd...)."""
        try:
            self._probe.register(fd, select.EPOLLIN)
            self._probe.unregister(fd)
        except (OSError, ValueError) as exc:
            raise Refused(f"kick fd cannot be watched: {exc}") from None

    def watch_kick(self, index, fd):
        try:
            self._server._watch_kick(index, fd)
        except (OSError, ValueError, KeyError) as exc:
            raise Refused(f"ring {index}: kick fd cannot be watched: {exc}") from None

    def close(self):
        self._probe.close()

    def unwatch_kick(self, index):
        self._server._unwatch_kick(index)


class Server:
    """``Server(path, image, num_queues=1, serial="vblock0", read_only=None, writeback=True,
    idle_timeout=IDLE_TIMEOUT)``.

    Binds at construction (so the socket exists when the constructor returns); ``serve_forever()``
    runs until :meth:`stop`; the image is closed by the caller. ``path=None`` binds nothing (use
    :meth:`serve_connection` with a socket of your own). ``idle_timeout`` (seconds): how long a
    front-end may leave a message incomplete, or a reply unread, before it is dropped.
    """

    def __init__(
        self,
        path,
        image,
        num_queues=1,
        serial="vblock0",
        read_only=None,
        writeback=True,
        idle_timeout=IDLE_TIMEOUT,
    ):
        self.path = path
        self.image = image
        self.idle_timeout = idle_timeout
        self._host = _Host(self)
        self.backend = VhostUserBlk(
            image,
            self._host,
            num_queues=num_queues,
            serial=serial,
            read_only=read_only,
            writeback=writeback,
        )
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._stopping = False
        self._calls = []  # functions call_soon() queued for the loop thread
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

    def call_soon(self, fn):
        """Run ``fn()`` on the loop's thread at its next wake-up (signal-handler safe: one list
        append and one pipe write). ``vblock serve`` logs the device's counters this way."""
        self._calls.append(fn)
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass

    def _woken(self):
        _drain_pipe(self._wake_r)
        while self._calls:
            self._calls.pop(0)()

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
                        self._woken()
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
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, ("conn", None))
        partial_at = None  # (stream position, monotonic time) where an incomplete message began
        try:
            while not self._stopping:
                timeout = None
                if partial_at is not None:
                    timeout = max(0.0, partial_at[1] + self.idle_timeout - time.monotonic())
                events = sel.select(timeout)
                if (
                    not events
                    and partial_at is not None
                    and time.monotonic() >= partial_at[1] + self.idle_timeout
                ):
                    _log.error(
                        "vhost-user: a message left incomplete for %g s; dropping the front-end",
                        self.idle_timeout,
                    )
                    return
                for key, _ in events:
                    kind, index = key.data
                    if kind == "kick":
                        got = self._read_kick(key.fd)
                        if got is True:
                            self.backend.kick(index)
                        elif got is not None:
                            self._unwatch_kick(index)
                            self.backend.kick_lost(index, got)
                    elif kind == "conn":
                        if not self._read_messages(conn, proto):
                            return
                        if not proto.partial:
                            partial_at = None
                        elif partial_at is None or partial_at[0] != proto.position:
                            partial_at = (proto.position, time.monotonic())
                    elif kind == "wake":
                        self._woken()
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
        """True for a notification, None for nothing to read, else why the fd is of no more use
        (end of file, an error): watching it again would only spin."""
        try:
            got = os.read(fd, 8)
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as exc:
            return f"cannot be read ({exc.strerror})"
        if not got:
            return "is at end of file"
        return True

    def _read_messages(self, conn, proto):
        """Read what the socket has, handle every whole message; False once the peer is gone."""
        try:
            data, fds, flags = _recv_with_fds(conn)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            data, fds, flags = b"", [], 0
        if flags & socket.MSG_CTRUNC:
            _close_quietly(fds)
            _log.error(
                "vhost-user: a message came with more fds than %d (ancillary data truncated); "
                "dropping the front-end",
                P.MAX_FDS,
            )
            return False
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
                _log.exception(
                    "vhost-user: internal error handling request %s; dropping the front-end",
                    req.code,
                )
                return False
            if out and not self._send(conn, out):
                return False

    def _send(self, conn, data):
        """Send ``data`` on the non-blocking ``conn``; False if the peer is gone, does not read it
        within ``idle_timeout``, or :meth:`stop` was called meanwhile."""
        view = memoryview(data)
        deadline = time.monotonic() + self.idle_timeout
        while view:
            try:
                view = view[conn.send(view) :]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return False
            left = deadline - time.monotonic()
            if left <= 0 or self._stopping:
                _log.error("vhost-user: the front-end does not read its replies; dropping it")
                return False
            poll = select.poll()  # not select(): fds may be numbered past FD_SETSIZE
            poll.register(self._wake_r, select.POLLIN)
            poll.register(conn, select.POLLOUT)
            for fd, _ in poll.poll(left * 1000):
                if fd == self._wake_r:
                    _drain_pipe(self._wake_r)
        return True

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
            self._host.close()


def _recv_with_fds(sock):
    """``(data, fds, flags)`` from one ``recvmsg``; every fd received is close-on-exec and
    non-blocking before anything else sees it."""
    fds = array.array("i")
    data, ancdata, flags, _addr = sock.recvmsg(_RECV_BYTES, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    for fd in fds:
        try:
            os.set_blocking(fd, False)
        except OSError:
            pass  # an fd whose flags cannot change is refused or closed where it is used
    return data, list(fds), flags


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

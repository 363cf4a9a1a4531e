"""``vblock serve`` against a hostile or buggy vhost-user front-end, one named test per case.

Each test plays one misbehaviour and checks its documented outcome (a failed reply, a dropped
front-end, a ring that stops, a process that ends on a signal); then a correct front-end still
writes and reads a sector through the same server, and every other byte of the image is what it
was (checksums before and after). Cases that could kill the server process (SIGBUS) or need a
signal run against ``vblock serve`` in a subprocess; the others against a ``Server`` in a thread,
on one end of a socketpair. Waits are bounded: a reply, an fd becoming readable, the peer closing.
"""

from __future__ import annotations

import fcntl
import hashlib
import mmap
import os
import select
import signal
import socket
import subprocess
import sys
import threading

import pytest

import vblock
from tests.vhost_user.frontend import (
    LINUX_FEATURES,
    RAM_BYTES,
    T_IN,
    T_OUT,
    UVA_BASE,
    WAIT,
    Frontend,
    GuestRing,
    sealed_memfd,
)
from vblock.vhost_user import protocol as P
from vblock.vhost_user.protocol import Req
from vblock.vhost_user.server import Server

DISK = 8 << 20
PROBE = 2048  # the sector the post-check writes and reads (1 MiB into the image)
PROBE_DATA = bytes(range(256)) * 16  # 4 KiB
IDLE = 0.3  # seconds: the in-thread server's idle timeout, kept short so the tests are quick
U64 = 1 << 64


# -- the image and its checksums ------------------------------------------------------------------
def _make_image(path):
    with open(path, "wb") as f:
        f.write(hashlib.shake_256(b"hostile-frontend").digest(DISK))  # a pattern no probe mistakes


def _digest(path, skip=None):
    """SHA-256 of the image, with the byte range ``skip`` = (offset, length) left out."""
    with open(path, "rb") as f:
        data = f.read()
    if skip is not None:
        data = data[: skip[0]] + data[skip[0] + skip[1] :]
    return hashlib.sha256(data).hexdigest()


_PROBE_RANGE = (PROBE * 512, len(PROBE_DATA))


def _correct_session(fe):
    """A correct front-end's whole life: connect, memory, one ring, write and read back a sector."""
    fe.connect()
    assert fe.set_mem_table() == 0
    ring = fe.start_ring(0, LINUX_FEATURES)
    assert ring.run(T_OUT, PROBE, data=PROBE_DATA)[0] == 0
    status, _, data = ring.run(T_IN, PROBE, length=len(PROBE_DATA))
    assert status == 0 and data == PROBE_DATA
    assert fe.stop_ring(0) == 2


def _closed_by_peer(sock):
    """Wait (bounded) until the other end has closed ``sock``, without reading from it."""
    p = select.poll()
    p.register(sock, select.POLLRDHUP)
    events = p.poll(WAIT * 1000)
    return bool(events) and bool(events[0][1] & (select.POLLRDHUP | select.POLLHUP))


def _readable(fd):
    return bool(select.select([fd], [], [], WAIT)[0])


def _pipe_reader_sees_eof(r):
    """True once every copy of the pipe's write end is closed (the reader gets end of file)."""
    assert _readable(r)
    return os.read(r, 1) == b""


# -- a server in a thread -------------------------------------------------------------------------
class InThread:
    """A ``Server`` over one image; each :meth:`session` serves one socketpair in a thread."""

    def __init__(self, path):
        self.path = path
        self.img = vblock.open_image(path, format="raw")
        self.server = Server(None, self.img, idle_timeout=IDLE)
        self.errors = []

    def session(self, seals=None):
        a, b = socket.socketpair()
        fe = Frontend(a, seals=seals)
        t = threading.Thread(target=self._serve, args=(b,), daemon=True)
        t.start()
        fe.thread = t
        return fe

    def _serve(self, sock):
        try:
            self.server.serve_connection(sock)
        except BaseException as exc:  # surfaced by end()
            self.errors.append(exc)
        finally:
            sock.close()

    def end(self, fe):
        fe.close()
        fe.thread.join(WAIT)
        assert not fe.thread.is_alive()
        assert self.errors == []

    def still_serves(self):
        """The post-check: a correct session on the same server, and the image intact."""
        fe = self.session()
        _correct_session(fe)
        self.end(fe)

    def new_server(self):
        """A fresh ``Server`` on the same image, after :meth:`Server.stop` ended this one."""
        self.server.close()
        self.server = Server(None, self.img, idle_timeout=IDLE)

    def close(self):
        self.server.close()
        self.img.close()


@pytest.fixture
def hostile(scratch):
    path = str(scratch / "disk.raw")
    _make_image(path)
    before = _digest(path, _PROBE_RANGE)
    h = InThread(path)
    yield h
    h.still_serves()
    h.close()
    assert _digest(path, _PROBE_RANGE) == before
    with open(path, "rb") as f:
        f.seek(_PROBE_RANGE[0])
        assert f.read(_PROBE_RANGE[1]) == PROBE_DATA


# -- a server in a process ------------------------------------------------------------------------
class ServeProcess:
    """``vblock serve`` on a unix socket, in a subprocess."""

    def __init__(self, scratch, image):
        self.sock_path = str(scratch / "serve.sock")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "vblock.cli.main",
                "serve",
                "-f",
                "raw",
                "--vhost-user",
                self.sock_path,
                image,
            ],
            stderr=subprocess.PIPE,
        )
        self.log = []
        err = self.proc.stderr
        ready = select.select([err], [], [], WAIT)[0]
        first = err.readline().decode() if ready else ""
        self.log.append(first)
        assert f"on {self.sock_path}" in first, first  # printed once the socket listens
        self._drain = threading.Thread(target=self._read_log, daemon=True)
        self._drain.start()

    def _read_log(self):
        for line in self.proc.stderr:
            self.log.append(line.decode())

    def connect(self, seals=None):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(self.sock_path)
        return Frontend(sock, seals=seals)

    def alive(self):
        return self.proc.poll() is None

    def end(self, sig=signal.SIGTERM):
        """Send ``sig``; the process must exit 0 within a bounded time."""
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(WAIT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"vblock serve ignored {sig!r}: {''.join(self.log)}") from None
        self._drain.join(WAIT)
        self.proc.stderr.close()
        assert code == 0, "".join(self.log)
        assert not os.path.exists(self.sock_path)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(WAIT)
        self.proc.stderr.close()


@pytest.fixture
def image(scratch):
    path = str(scratch / "disk.raw")
    _make_image(path)
    return path


@pytest.fixture
def serve(scratch, image):
    s = ServeProcess(scratch, image)
    yield s
    s.kill()


# -- guest memory that could shrink -----------------------------------------------------------------
def test_memfd_without_seal_shrink_is_refused(hostile):
    fe = hostile.session(seals=0)
    fe.connect()
    assert fe.set_mem_table() == 1
    assert hostile.server.backend.regions == []
    hostile.end(fe)


def test_memfd_sealed_against_growing_only_is_refused(hostile):
    fe = hostile.session(seals=fcntl.F_SEAL_GROW)
    fe.connect()
    assert fe.set_mem_table() == 1
    hostile.end(fe)


def test_file_smaller_than_the_region_is_refused(hostile, scratch):
    fe = hostile.session()
    fe.connect()
    small = scratch / "ram.img"
    with open(small, "wb") as f:
        f.truncate(RAM_BYTES // 2)
    fd = os.open(small, os.O_RDWR)
    try:
        assert fe.request(Req.SET_MEM_TABLE, (fe.region(),), fds=(fd,)) == 1
    finally:
        os.close(fd)
    hostile.end(fe)


def test_mmap_offset_plus_size_past_the_file_is_refused(hostile):
    fe = hostile.session()
    fe.connect()
    region = P.MemRegion(0, RAM_BYTES, UVA_BASE, 4096)
    assert fe.request(Req.SET_MEM_TABLE, (region,), fds=(fe.memfd,)) == 1
    hostile.end(fe)


def test_regular_file_holding_the_region_is_accepted_as_trusted(hostile, scratch):
    """``memory-backend-file``: a plain file as large as the region serves (trusted, documented)."""
    fe = hostile.session()
    fe.connect()
    ram = scratch / "ram.img"
    with open(ram, "wb") as f:
        f.truncate(RAM_BYTES)
    fd = os.open(ram, os.O_RDWR)
    try:
        fe.ram.close()
        fe.ram = mmap.mmap(fd, RAM_BYTES)
        assert fe.request(Req.SET_MEM_TABLE, (fe.region(),), fds=(fd,)) == 0
        ring = fe.start_ring(0, LINUX_FEATURES)
        assert ring.run(T_OUT, PROBE, data=PROBE_DATA)[0] == 0
        assert fe.stop_ring(0) == 1
    finally:
        os.close(fd)
    hostile.end(fe)


def test_guest_memory_shrunk_after_the_table_and_kicked_does_not_kill_serve(serve, image):
    before = _digest(image)
    untouched = _digest(image, _PROBE_RANGE)
    fe = serve.connect(seals=0)
    fe.connect()
    ring = GuestRing(fe, 0, 16, True)
    ring.submit(T_IN, 0, length=4096)  # a request waiting in RAM that is about to go
    assert fe.set_mem_table() == 1  # shrinkable: refused, so nothing of it is ever mapped
    fe.start_ring(0, LINUX_FEATURES, ring=ring)
    os.ftruncate(fe.memfd, 0)
    ring.notify()
    assert fe.get_u64(Req.GET_FEATURES)  # still answering: the kick did not kill it
    assert serve.alive()
    fe.sock.close()  # not fe.close(): its RAM mapping is gone and must not be touched
    os.close(fe.memfd)
    assert _digest(image) == before
    good = serve.connect()
    _correct_session(good)
    good.close()
    serve.end()
    assert _digest(image, _PROBE_RANGE) == untouched


def test_add_mem_reg_of_a_shrinkable_memfd_is_refused(hostile):
    fe = hostile.session()
    fe.connect()
    fd = sealed_memfd("more-ram", 1 << 20, seals=0)
    try:
        assert (
            fe.request(
                Req.ADD_MEM_REG, P.MemRegion(64 << 20, 1 << 20, 0x7E00_0000_0000, 0), fds=(fd,)
            )
            == 1
        )
    finally:
        os.close(fd)
    hostile.end(fe)


# -- degenerate regions ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "regions",
    [
        pytest.param([(0, 0, UVA_BASE, 0)], id="size-zero"),
        pytest.param(
            [(0, 1 << 20, UVA_BASE, 0), (0x80000, 1 << 20, UVA_BASE + (4 << 20), 1 << 20)],
            id="overlapping-guest-ranges",
        ),
        pytest.param(
            [(0, 1 << 20, UVA_BASE, 0), (4 << 20, 1 << 20, UVA_BASE + 0x80000, 1 << 20)],
            id="overlapping-user-ranges",
        ),
        pytest.param([(0, 1 << 20, U64 - 4096, 0)], id="user-range-wraps"),
        pytest.param([(U64 - 4096, 1 << 20, UVA_BASE, 0)], id="guest-range-wraps"),
        pytest.param([(0, 1 << 20, UVA_BASE, U64 - 4096)], id="file-offset-wraps"),
    ],
)
def test_degenerate_memory_table_is_refused(hostile, regions):
    fe = hostile.session()
    fe.connect()
    table = tuple(P.MemRegion(*r) for r in regions)
    fds = [os.dup(fe.memfd) for _ in table]
    assert fe.request(Req.SET_MEM_TABLE, table, fds=fds) == 1
    for fd in fds:
        os.close(fd)
    assert hostile.server.backend.regions == []
    hostile.end(fe)


def test_mmap_failure_is_a_failed_reply(hostile):
    """A memfd sealed against writes cannot be mapped shared and writable (EPERM)."""
    fe = hostile.session(seals=fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    fe.connect()
    fe.ram.close()  # a writable shared mapping would forbid F_SEAL_WRITE
    fcntl.fcntl(fe.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    fe.ram = bytearray(0)
    assert fe.set_mem_table() == 1
    assert fe.get_u64(Req.GET_FEATURES)  # the session goes on: not an internal error
    hostile.end(fe)


# -- fds ------------------------------------------------------------------------------------------
def test_fds_on_a_message_that_takes_none_are_closed(hostile):
    fe = hostile.session()
    fe.connect()
    r, w = os.pipe()
    try:
        for _ in range(64):  # 2048 fds in all: far past the usual limit if they were kept
            fe.send(Req.GET_FEATURES, fds=[w] * P.MAX_FDS)
            fe.recv_reply(Req.GET_FEATURES)
        os.close(w)
        assert _pipe_reader_sees_eof(r)  # the server holds no copy of the write end
        assert fe.set_mem_table() == 0  # and can still take guest memory
    finally:
        os.close(r)
    hostile.end(fe)


def test_truncated_ancillary_data_drops_the_front_end_and_closes_its_fds(hostile):
    fe = hostile.session()
    fe.connect()
    r, w = os.pipe()
    try:
        fe.send(Req.GET_FEATURES, fds=[w] * (P.MAX_FDS + 8))  # more than fit: MSG_CTRUNC
        assert _closed_by_peer(fe.sock)
        os.close(w)
        assert _pipe_reader_sees_eof(r)
    finally:
        os.close(r)
    hostile.end(fe)


def test_received_fds_are_made_non_blocking(hostile):
    fe = hostile.session()
    fe.connect()
    assert fe.set_mem_table() == 0
    call = os.eventfd(0, os.EFD_CLOEXEC)  # blocking, as a careless front-end might pass it
    ring = GuestRing(fe, 0, 16, True)
    os.close(ring.call)
    ring.call = call
    fe.start_ring(0, LINUX_FEATURES, ring=ring)
    assert os.get_blocking(call) is False  # one open file, shared with the server
    assert ring.run(T_OUT, PROBE, data=PROBE_DATA)[0] == 0
    assert fe.stop_ring(0) == 1
    hostile.end(fe)


def test_saturated_blocking_call_eventfd_never_blocks_the_server(hostile):
    fe = hostile.session()
    fe.connect()
    assert fe.set_mem_table() == 0
    call = os.eventfd(0, os.EFD_CLOEXEC)
    full = (1 << 64) - 2  # the largest count an eventfd holds: one more write would block
    os.eventfd_write(call, full)
    ring = GuestRing(fe, 0, 16, True)
    os.close(ring.call)
    ring.call = call
    fe.start_ring(0, LINUX_FEATURES, ring=ring)
    heads = [ring.submit(T_OUT, PROBE, data=PROBE_DATA) for _ in range(3)]
    ring.notify()
    assert fe.stop_ring(0) == 3  # answered: every completion was published, none hung on the fd
    done = ring.wait(3)  # all in the used ring already; the call fd is not read
    assert sorted(done) == sorted(heads) and all(v[0] == 0 for v in done.values())
    assert os.eventfd_read(call) == full  # the server's signals found it saturated and moved on
    hostile.end(fe)


# -- config space ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "offset,size",
    [
        pytest.param(0xFFFFFF00, 256, id="offset-near-4GiB"),
        pytest.param(0xFFFFFFFF, 1, id="last-offset"),
        pytest.param(250, 10, id="ends-past-the-space"),
    ],
)
def test_get_config_outside_the_config_space_is_refused(hostile, offset, size):
    fe = hostile.session()
    fe.connect()
    payload = fe.recv_after(Req.GET_CONFIG, P.ConfigSpace(offset, size, 0, bytes(size)))
    assert payload == b""  # the failed GET_* reply; nothing was allocated for the range
    assert len(fe.get_config()) == 60  # the session goes on
    hostile.end(fe)


def test_set_config_outside_the_config_space_is_refused(hostile):
    fe = hostile.session()
    fe.connect()
    assert fe.request(Req.SET_CONFIG, P.ConfigSpace(0xFFFFFF00, 1, 0, b"\x01")) == 1
    hostile.end(fe)


# -- kick fds -------------------------------------------------------------------------------------
def test_kick_fd_at_end_of_file_stops_the_ring_instead_of_spinning(hostile):
    fe = hostile.session()
    fe.connect()
    assert fe.set_mem_table() == 0
    err = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    r, w = os.pipe()
    os.close(w)  # the writer is gone: the kick fd is at end of file for good
    ring = GuestRing(fe, 0, 16, True)
    os.close(ring.kick)
    ring.kick = r
    try:
        assert fe.request(Req.SET_VRING_ERR, 0, fds=(err,)) == 0
        fe.start_ring(0, LINUX_FEATURES, ring=ring)
        assert _readable(err)  # the front-end hears of it on the err fd
        assert 0 not in hostile.server._kicks  # no longer watched: the loop does not spin on it
        assert fe.get_u64(Req.GET_FEATURES)
        ring.kick = os.eventfd(
            0, os.EFD_NONBLOCK | os.EFD_CLOEXEC
        )  # a new kick fd revives the ring
        assert fe.request(Req.SET_VRING_KICK, 0, fds=(ring.kick,)) == 0
        assert ring.run(T_OUT, PROBE, data=PROBE_DATA)[0] == 0
        assert fe.stop_ring(0) == 1
    finally:
        os.close(r)
        os.close(err)
    hostile.end(fe)


def test_kick_fd_that_cannot_be_watched_is_refused(hostile, scratch):
    """epoll refuses a regular file (EPERM): a failed reply, not an internal error."""
    fe = hostile.session()
    fe.connect()
    assert fe.set_mem_table() == 0
    fd = os.open(scratch / "not-an-eventfd", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fe.request(Req.SET_FEATURES, LINUX_FEATURES)
        assert fe.request(Req.SET_VRING_KICK, 0, fds=(fd,)) == 1
    finally:
        os.close(fd)
    assert fe.get_u64(Req.GET_FEATURES)
    hostile.end(fe)


# -- a front-end that stops half-way -------------------------------------------------------------
@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(5, id="inside-the-header"),
        pytest.param(P.HEADER.size + 3, id="inside-the-payload"),
    ],
)
def test_half_sent_message_is_dropped_after_the_idle_timeout(hostile, cut):
    fe = hostile.session()
    fe.connect()
    msg = P.encode(Req.SET_FEATURES, P.u64.pack(LINUX_FEATURES))
    fe.sock.sendall(msg[:cut])
    assert _closed_by_peer(fe.sock)
    hostile.end(fe)


def test_front_end_that_never_reads_its_replies_is_dropped(hostile):
    fe = hostile.session()
    fe.connect()
    _flood_without_reading(fe.sock)
    assert _closed_by_peer(fe.sock)
    hostile.end(fe)


def test_stop_ends_a_session_whose_front_end_never_reads(hostile):
    """The loop is never stuck in a send: :meth:`Server.stop` (what SIGTERM and SIGINT call) ends
    the session while the front-end reads nothing, however long the idle timeout."""
    hostile.server.idle_timeout = 10 * WAIT  # only stop() can end it within the join below
    fe = hostile.session()
    fe.connect()
    _flood_without_reading(fe.sock)
    hostile.server.stop()
    fe.thread.join(WAIT)
    assert not fe.thread.is_alive()
    hostile.end(fe)
    hostile.new_server()


def _flood_without_reading(sock):
    """One send of far more GET_FEATUREs than the server's unread replies can queue (one chunk of
    the stream, so the server reads it in one go), then wait for the first reply: the server is
    then inside that batch and must stall on a reply nobody reads."""
    sock.sendall(P.encode(Req.GET_FEATURES) * 4000)  # 48000 bytes: under one receive of the server
    assert _readable(sock.fileno())


# -- signals --------------------------------------------------------------------------------------
def _state_idle(serve):
    return None


def _state_half_message(serve):
    fe = serve.connect()
    fe.connect()
    fe.sock.sendall(P.encode(Req.SET_FEATURES, P.u64.pack(LINUX_FEATURES))[:7])
    return fe


def _state_replies_unread(serve):
    fe = serve.connect()
    fe.connect()
    _flood_without_reading(fe.sock)
    return fe


def _state_saturated_call_fd(serve):
    fe = serve.connect()
    fe.connect()
    assert fe.set_mem_table() == 0
    ring = GuestRing(fe, 0, 16, True)
    os.close(ring.call)
    ring.call = os.eventfd(0, os.EFD_CLOEXEC)
    os.eventfd_write(ring.call, (1 << 64) - 2)
    fe.start_ring(0, LINUX_FEATURES, ring=ring)
    ring.submit(T_IN, 0, length=4096)
    ring.notify()
    assert fe.get_u64(Req.GET_FEATURES)  # the loop is alive after the kick
    return fe


def _state_ring_running(serve):
    fe = serve.connect()
    fe.connect()
    assert fe.set_mem_table() == 0
    ring = fe.start_ring(0, LINUX_FEATURES)
    assert ring.run(T_IN, 0, length=4096)[0] == 0
    ring.submit(T_IN, 8, length=4096)
    ring.notify()
    return fe


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize(
    "state",
    [
        _state_idle,
        _state_half_message,
        _state_replies_unread,
        _state_saturated_call_fd,
        _state_ring_running,
    ],
    ids=["idle", "half-message", "replies-unread", "saturated-call-fd", "ring-running"],
)
def test_signal_ends_serve_in_every_state(serve, scratch, image, state, sig):
    before = _digest(image, _PROBE_RANGE)
    fe = state(serve)
    serve.end(sig)
    if fe is not None:
        fe.close()
    again = ServeProcess(scratch, image)  # the image was left fit to serve again
    try:
        good = again.connect()
        _correct_session(good)
        good.close()
        again.end()
    finally:
        again.kill()
    assert _digest(image, _PROBE_RANGE) == before  # the hostile session served only reads

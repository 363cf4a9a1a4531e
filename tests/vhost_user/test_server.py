"""The vhost-user server and back-end driven by a fake front-end (``frontend.py``) over a
socketpair or the server's unix socket: the message sequence QEMU sends (reference §4), feature
renegotiation on one connection, a memory table re-sent while a ring runs, disconnect and
reconnect, refused requests, and ``vblock serve``'s clean close on SIGTERM."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import vblock
from tests.vhost_user.frontend import (
    F_EVENT_IDX,
    F_MQ,
    LINUX_FEATURES,
    SEABIOS_FEATURES,
    T_FLUSH,
    T_IN,
    T_OUT,
    Frontend,
    sealed_memfd,
)
from vblock.vhost_user import protocol as P
from vblock.vhost_user.protocol import Req
from vblock.vhost_user.server import Server, bind_unix

DISK = 8 << 20
PAT = bytes(range(256)) * 16  # 4 KiB


class Served:
    """A server on one end of a socketpair, serving in a thread; the fake front-end on the other."""

    def __init__(self, img, **kw):
        self.img = img
        self.server = Server(None, img, **kw)
        a, b = socket.socketpair()
        self.fe = Frontend(a)
        self._b = b
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.error = None
        self.thread.start()

    def _run(self):
        try:
            self.server.serve_connection(self._b)
        except BaseException as exc:  # surfaced by finish()
            self.error = exc
        finally:
            self._b.close()

    def finish(self):
        self.fe.close()
        self.thread.join(30)
        assert not self.thread.is_alive()
        assert self.error is None, self.error
        self.server.close()


@pytest.fixture
def image(scratch):
    img = vblock.create_image(str(scratch / "disk.raw"), "raw", DISK)
    yield img
    img.close()


@pytest.fixture
def served(image):
    s = Served(image)
    yield s
    if s.thread.is_alive():
        s.finish()


def test_connect_sequence_answers_as_qemu_expects(served):
    fe = served.fe
    feats, pf, queues, slots = fe.connect()
    assert feats >> 32 & 1 and feats >> P.VHOST_USER_F_PROTOCOL_FEATURES & 1
    assert feats & F_EVENT_IDX and feats >> 28 & 1  # EVENT_IDX and INDIRECT_DESC offered
    assert (
        not feats >> 34 & 1
    )  # RING_PACKED: not served over vhost-user (GET/SET_VRING_BASE differ)
    assert pf >> P.PROTOCOL_F_CONFIG & 1  # mandatory for QEMU
    assert pf >> P.PROTOCOL_F_REPLY_ACK & 1 and pf >> P.PROTOCOL_F_MQ & 1
    assert queues == 1 and slots == 32
    cfg = fe.get_config()
    assert int.from_bytes(cfg[0:8], "little") == DISK // 512  # capacity in sectors
    assert cfg[0x20] == 1  # writeback reported (default --writeback on)
    served.finish()


def test_seabios_then_linux_on_one_connection(served, image):
    """Start with SeaBIOS's features (no EVENT_IDX), one read, stop; restart with Linux's."""
    fe = served.fe
    fe.connect()
    image.write(0, PAT)
    image.flush()
    assert fe.add_mem_reg() == 0
    ring = fe.start_ring(0, SEABIOS_FEATURES)
    status, used_len, data = ring.run(T_IN, 0, length=512)
    assert (status, used_len, data) == (0, 513, PAT[:512])
    assert fe.stop_ring(0) == 1  # GET_VRING_BASE: one request consumed

    ring2 = fe.start_ring(0, LINUX_FEATURES, size=32)  # fresh ring memory, base 0, EVENT_IDX now
    for i in range(10):
        assert ring2.run(T_OUT, 8 * i, data=bytes([i]) * 4096)[0] == 0
    assert ring2.run(T_FLUSH, 0)[0] == 0
    got = ring2.run(T_IN, 8 * 9, length=4096)
    assert got[0] == 0 and got[2] == bytes([9]) * 4096
    assert fe.stop_ring(0) == 12
    served.finish()
    assert image.read(8 * 512 * 3, 4096) == bytes([3]) * 4096
    assert served.server.backend.flushes == 1


def test_many_requests_in_flight_complete(served, image):
    fe = served.fe
    fe.connect()
    fe.set_mem_table()
    ring = fe.start_ring(0, LINUX_FEATURES, size=64)
    heads = [ring.submit(T_OUT, 16 * i, data=bytes([0x40 + i]) * 8192) for i in range(16)]
    ring.notify()
    done = ring.wait(len(heads))
    assert sorted(done) == sorted(heads) and all(v[0] == 0 for v in done.values())
    assert fe.stop_ring(0) == 16
    served.finish()
    for i in range(16):
        assert image.read(16 * 512 * i, 8192) == bytes([0x40 + i]) * 8192


def test_mem_table_resent_while_ring_runs(served, image):
    fe = served.fe
    fe.connect(protocol_features=(1 << P.PROTOCOL_F_CONFIG) | (1 << P.PROTOCOL_F_REPLY_ACK))
    assert fe.set_mem_table() == 0
    ring = fe.start_ring(0, LINUX_FEATURES)
    assert ring.run(T_OUT, 0, data=PAT)[0] == 0
    assert fe.set_mem_table() == 0  # as QEMU does during the SeaBIOS start
    assert ring.run(T_OUT, 8, data=PAT[::-1])[0] == 0
    assert ring.run(T_IN, 0, length=4096)[2] == PAT
    assert fe.stop_ring(0) == 3
    served.finish()
    assert image.read(4096, 4096) == PAT[::-1]


def test_rings_wait_for_enable_with_protocol_features(served, image):
    fe = served.fe
    fe.connect()
    fe.set_mem_table()
    ring = fe.start_ring(0, LINUX_FEATURES, enable=False)
    ring.submit(T_OUT, 0, data=PAT)
    ring.notify()
    # not enabled: the back-end must not take the request; GET_CONFIG round-trips prove it had time
    fe.get_config()
    assert fe.ram[ring.used + 2] == 0  # used idx untouched
    assert fe.request(Req.SET_VRING_ENABLE, (0, 1)) == 0
    done = ring.wait(1)
    assert list(done.values())[0][0] == 0
    served.finish()
    assert image.read(0, 4096) == PAT


def test_two_queues_with_mq(image):
    s = Served(image, num_queues=2)
    fe = s.fe
    _, _, queues, _ = fe.connect()
    assert queues == 2
    fe.set_mem_table()
    r0 = fe.start_ring(0, LINUX_FEATURES | F_MQ)
    r1 = fe.start_ring(1, LINUX_FEATURES | F_MQ)
    h0 = r0.submit(T_OUT, 0, data=b"\x11" * 4096)
    h1 = r1.submit(T_OUT, 8, data=b"\x22" * 4096)
    r0.notify()
    r1.notify()
    assert r0.wait(1)[h0][0] == 0 and r1.wait(1)[h1][0] == 0
    assert fe.stop_ring(0) == 1 and fe.stop_ring(1) == 1
    s.finish()
    assert image.read(0, 8192) == b"\x11" * 4096 + b"\x22" * 4096


def test_unknown_request_is_refused_and_the_session_goes_on(served):
    fe = served.fe
    fe.connect()
    fe.send(99, raw=b"\0" * 8, flags=P.VERSION | P.FLAG_NEED_REPLY)
    assert P.u64.unpack(fe.recv_reply(99))[0] == 1  # REPLY_ACK: failed
    fe.send(Req.SET_LOG_BASE, raw=b"\0" * 16, flags=P.VERSION | P.FLAG_NEED_REPLY)
    assert P.u64.unpack(fe.recv_reply(Req.SET_LOG_BASE))[0] == 1
    assert (
        fe.request(Req.SET_CONFIG, P.ConfigSpace(0, 8, 0, bytes(8))) == 1
    )  # capacity is read-only
    assert fe.get_u64(Req.GET_QUEUE_NUM) == 1
    served.finish()


def test_protocol_error_drops_the_front_end(served):
    fe = served.fe
    fe.connect()
    fe.send(Req.SET_VRING_NUM, raw=b"\0" * 3)  # wrong payload size
    served.thread.join(30)
    assert not served.thread.is_alive()
    assert fe.sock.recv(16) == b""  # the back-end hung up
    served.finish()


def test_set_config_writeback_reaches_the_device(served):
    fe = served.fe
    fe.connect()
    fe.set_mem_table()
    fe.start_ring(0, LINUX_FEATURES)
    assert fe.request(Req.SET_CONFIG, P.ConfigSpace(0x20, 1, 0, b"\0")) == 0
    assert fe.get_config()[0x20] == 0
    served.finish()


def _header_features(path):
    with open(path, "rb") as f:
        return int.from_bytes(f.read(24)[16:24], "little")


def test_disconnect_then_reconnect_on_the_unix_socket(scratch):
    img = vblock.create_image(str(scratch / "d.raw"), "raw", DISK)
    path = str(scratch / "s.sock")
    server = Server(path, img)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        for round_ in range(2):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            fe = Frontend(sock)
            fe.connect()
            fe.set_mem_table()
            ring = fe.start_ring(0, LINUX_FEATURES)
            if round_:
                assert ring.run(T_IN, 0, length=4096)[2] == PAT  # written by the first front-end
            else:
                assert ring.run(T_OUT, 0, data=PAT)[0] == 0
            fe.close()  # disconnect without stopping the ring, as a crashed QEMU would
    finally:
        server.stop()
        t.join(30)
        img.close()
    assert not t.is_alive()
    assert server.connections == 2
    assert not os.path.exists(path)


def test_stale_socket_file_is_replaced_and_a_live_one_refused(scratch):
    path = str(scratch / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays: stale
    live = bind_unix(path)
    try:
        with pytest.raises(OSError):
            bind_unix(path)
    finally:
        live.close()
        os.unlink(path)
    with open(path, "w"):
        pass
    with pytest.raises(FileExistsError):
        bind_unix(path)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_signal_drains_flushes_and_clears_qed_need_check(scratch, sig):
    path = str(scratch / "d.qed")
    vblock.create_image(path, "qed", 64 << 20).close()
    sock_path = str(scratch / "serve.sock")
    log = open(scratch / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblock.cli.main", "serve", "--vhost-user", sock_path, path],
        stderr=log,
    )
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock_path):
            assert proc.poll() is None, pathlib.Path(scratch / "serve.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sock_path)
        fe = Frontend(sock)
        fe.connect()
        fe.set_mem_table()
        ring = fe.start_ring(0, LINUX_FEATURES)
        for i in range(8):  # allocating writes: the image is marked need-check
            assert ring.run(T_OUT, 2048 * i, data=bytes([i + 1]) * 4096)[0] == 0
        assert _header_features(path) & 0x2
        proc.send_signal(sig)
        assert proc.wait(60) == 0
        fe.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    assert not os.path.exists(sock_path)
    assert _header_features(path) & 0x2 == 0  # clean close cleared need-check
    text = (scratch / "serve.log").read_text()
    assert "closed" in text and "1 connections" in text
    with vblock.open_image(path, read_only=True) as img:
        for i in range(8):
            assert img.read(2048 * 512 * i, 4096) == bytes([i + 1]) * 4096


def test_serve_logs_the_device_counters_on_sigusr1_and_at_exit(scratch):
    path = str(scratch / "d.raw")
    vblock.create_image(path, "raw", DISK).close()
    sock_path = str(scratch / "serve.sock")
    argv = ["serve", "--vhost-user", sock_path, "-f", "raw", path]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblock.cli.main", *argv], stderr=subprocess.PIPE, text=True
    )
    try:
        assert "on " + sock_path in proc.stderr.readline()  # printed once the socket listens
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(sock_path)
        fe = Frontend(sock)
        fe.connect()
        fe.set_mem_table()
        ring = fe.start_ring(0, LINUX_FEATURES)
        for i in range(8):
            assert ring.run(T_OUT, 8 * i, data=PAT)[0] == 0
        assert ring.run(T_FLUSH, 0)[0] == 0
        proc.send_signal(signal.SIGUSR1)
        first = [proc.stderr.readline(), proc.stderr.readline()]
        assert ring.run(T_IN, 0, length=4096)[0] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        rest = proc.stderr.read()
        fe.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    write = f"vblock serve: write: 8 requests, {8 * len(PAT)} bytes, 0 errors, latency p50 "
    assert first[0].startswith(write)  # types in stats() order: read (none yet), write, flush
    assert first[1].startswith("vblock serve: flush: 1 requests, 0 bytes, 0 errors, latency p50 ")
    assert f"vblock serve: read: 1 requests, {len(PAT)} bytes, 0 errors" in rest
    assert write in rest and "closed" in rest.splitlines()[-1]


def test_stats_lines_name_each_type_seen_or_say_none():
    from vblock.cli.serve import stats_lines

    zero = {"ops": 0, "bytes": 0, "errors": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    write = {**zero, "ops": 2, "bytes": 8192, "p50": 40.0, "p99": 90.5, "max": 91.0}
    stats = {"read": zero, "write": write, "queues": []}
    assert stats_lines(stats) == [
        "write: 2 requests, 8192 bytes, 0 errors, latency p50 40.0 us, p99 90.5 us, max 91.0 us"
    ]
    assert stats_lines({"read": zero, "queues": []}) == ["no requests served"]


def test_add_and_remove_a_region_while_the_ring_runs(served, image):
    fe = served.fe
    fe.connect()
    assert fe.add_mem_reg() == 0
    ring = fe.start_ring(0, LINUX_FEATURES)
    extra_fd = sealed_memfd("more-ram", 1 << 20)
    extra = P.MemRegion(64 << 20, 1 << 20, 0x7E00_0000_0000, 0)
    try:
        assert fe.request(Req.ADD_MEM_REG, extra, fds=(extra_fd,)) == 0
        assert ring.run(T_OUT, 0, data=PAT)[0] == 0  # the ring's views survived the new table
        assert fe.request(Req.REM_MEM_REG, extra) == 0
        assert fe.request(Req.REM_MEM_REG, extra) == 1  # no such region any more
        assert ring.run(T_IN, 0, length=4096)[2] == PAT
    finally:
        os.close(extra_fd)
    assert fe.stop_ring(0) == 2
    served.finish()


def test_ring_outside_guest_memory_is_not_started_and_err_fd_fires(served):
    fe = served.fe
    fe.connect()
    fe.set_mem_table()
    err = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert fe.request(Req.SET_VRING_ERR, 0, fds=(err,)) == 0
        fe.request(Req.SET_FEATURES, LINUX_FEATURES)
        fe.request(Req.SET_VRING_NUM, (0, 16))
        fe.request(Req.SET_VRING_BASE, (0, 0))
        far = 0x7F00_0000_0000 + (64 << 20)  # past the end of the only region
        fe.request(Req.SET_VRING_ADDR, P.VringAddr(0, 0, far, far + 0x1000, far + 0x800, 0))
        kick = os.eventfd(0)
        assert fe.request(Req.SET_VRING_KICK, 0, fds=(kick,)) == 0
        assert fe.request(Req.SET_VRING_ENABLE, (0, 1)) == 0
        assert os.eventfd_read(err) == 1  # the back-end reported the broken ring
        assert fe.stop_ring(0) == 0
        os.close(kick)
    finally:
        os.close(err)
    served.finish()


def test_read_only_offers_ro_and_answers_writes_with_ioerr(image):
    image.write(0, PAT)
    s = Served(image, read_only=True)
    fe = s.fe
    feats, _, _, _ = fe.connect()
    assert feats >> 5 & 1  # VIRTIO_BLK_F_RO
    fe.set_mem_table()
    ring = fe.start_ring(0, LINUX_FEATURES | 1 << 5)
    assert ring.run(T_OUT, 0, data=b"\0" * 4096)[0] == 1  # VIRTIO_BLK_S_IOERR
    assert ring.run(T_IN, 0, length=4096)[2] == PAT
    s.finish()
    assert image.read(0, 4096) == PAT


def test_the_reference_sequence_with_q35_memory_layout(served, image):
    """QEMU 7.2's messages in the order captured in the reference (§4), with guest RAM as two
    regions of one memfd around the 640K-1M hole, ring and buffers above it."""
    fe = served.fe
    assert fe.get_u64(Req.GET_FEATURES) >> 32 & 1
    pf = fe.get_u64(Req.GET_PROTOCOL_FEATURES)
    fe.send(Req.SET_PROTOCOL_FEATURES, pf)
    fe.protocol_features = pf
    assert fe.get_u64(Req.GET_QUEUE_NUM) == 1
    assert fe.get_u64(Req.GET_MAX_MEM_SLOTS) == 32
    assert fe.request(Req.SET_OWNER) == 0
    fe.get_u64(Req.GET_FEATURES)
    call0 = os.eventfd(0, os.EFD_NONBLOCK)
    err0 = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert fe.request(Req.SET_VRING_CALL, 0, fds=(call0,)) == 0
        assert fe.request(Req.SET_VRING_ERR, 0, fds=(err0,)) == 0
        assert len(fe.get_config(57)) == 57
        for features in (SEABIOS_FEATURES, LINUX_FEATURES):
            assert fe.request(Req.SET_FEATURES, features) == 0  # sent twice, as QEMU does
            if features == SEABIOS_FEATURES:
                low = P.MemRegion(0, 0xA0000, 0x7F00_0000_0000, 0)
                high = P.MemRegion(
                    0xC0000, len(fe.ram) - 0xC0000, 0x7F00_0000_0000 + 0xC0000, 0xC0000
                )
                assert fe.add_mem_reg(low) == 0 and fe.add_mem_reg(high) == 0
                fe._next_alloc = 0x100000  # the guest's rings and buffers live above 1 MiB
            ring = fe.start_ring(0, features, size=32)
            image.write(0, PAT)
            assert ring.run(T_IN, 0, length=4096)[2] == PAT
            assert ring.run(T_OUT, 8, data=PAT)[0] == 0
            assert fe.stop_ring(0) == 2
    finally:
        os.close(call0)
        os.close(err0)
    served.finish()
    assert image.read(4096, 4096) == PAT


def test_the_backend_installs_real_fences():
    from vblock.vhost_user.backend import install_fences
    from vblock.virtio import _binding, queue

    install_fences()
    assert (queue.acquire_fence, queue.release_fence, queue.full_fence) == (
        _binding.fence_acquire,
        _binding.fence_release,
        _binding.fence_full,
    )

"""The NBD client: URIs, ``NbdFile`` against vblock's own server, then raw images and QED backing
files over qemu-nbd and nbdkit (skipped when they are missing)."""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

import vblock
from tests.files import digest
from tests.nbd.nbd_helpers import need
from vblock.errors import UnsupportedError
from vblock.nbd import protocol as P
from vblock.nbd.client import NbdFile
from vblock.nbd.uri import NbdAddress, parse_address, parse_uri

MiB = 1 << 20


# -- URIs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "uri,addr",
    [
        ("nbd+unix:///disk?socket=/run/s.sock", NbdAddress("disk", socket="/run/s.sock")),
        ("nbd+unix://?socket=/s", NbdAddress("", socket="/s")),
        ("nbd+unix:///my%20exp?socket=/s", NbdAddress("my exp", socket="/s")),
        ("nbd://127.0.0.1:10810/e", NbdAddress("e", host="127.0.0.1", port=10810)),
        ("nbd://localhost/", NbdAddress("", host="localhost", port=10809)),
        ("nbd+tcp://[::1]:99/x", NbdAddress("x", host="::1", port=99)),
    ],
)
def test_uris_parse_as_qemu_reads_them(uri, addr):
    assert parse_uri(uri) == addr
    assert parse_uri(addr.uri()) == addr


@pytest.mark.parametrize(
    "uri,why",
    [
        ("nbd+unix://host/e?socket=/s", "no host"),
        ("nbd+unix:///e", "socket=PATH"),
        ("nbd+unix:///e?socket=/s&x=1", "socket=PATH"),
        ("nbd:///e", "needs a host"),
        ("nbd://h/e?socket=/s", "no parameters"),
        ("nbd+unix:///my exp?socket=/s", "white space"),
    ],
)
def test_bad_uris_say_why(uri, why):
    with pytest.raises(ValueError, match=why):
        parse_uri(uri)


def test_server_addresses_are_socket_paths_or_host_port():
    assert parse_address("/run/x.sock") == NbdAddress(socket="/run/x.sock")
    assert parse_address("127.0.0.1:10809") == NbdAddress(host="127.0.0.1", port=10809)
    with pytest.raises(ValueError, match="neither a socket path"):
        parse_address("localhost")


# -- against vblock's own server -------------------------------------------------------------------
@pytest.fixture
def base(scratch):
    path = scratch / "base.raw"
    with open(path, "wb") as f:
        f.write(os.urandom(MiB))
        f.seek(3 * MiB)
        f.write(os.urandom(64 << 10))
        f.truncate(8 * MiB)
    return path


def test_nbdfile_reads_writes_and_maps_like_a_host_file(served, base):
    _, _, uri = served(base)
    f = NbdFile(uri)
    try:
        assert f.size == 8 * MiB and f.alignment == 1
        buf = bytearray(100)
        f.submit_read(MiB - 50, [buf]).result()
        with open(base, "rb") as src:
            src.seek(MiB - 50)
            assert bytes(buf) == src.read(50) + bytes(50)
        a, b = bytearray(3), bytearray(5)
        f.submit_write(10, [b"abc", b"defgh"]).result()
        f.submit_read(10, [a, b]).result()
        assert bytes(a + b) == b"abcdefgh"
        assert f.seek_data(MiB) == 3 * MiB and f.seek_hole(3 * MiB) == 3 * MiB + (64 << 10)
        assert f.seek_data(4 * MiB) is None and f.seek_hole(0) == MiB
        f.submit_flush().result()
    finally:
        f.close()


def test_requests_submitted_from_completions_complete(served, base):
    """Completions run on the receiving thread; what they submit is sent by another thread, so
    the receiver never blocks in a send. A chain of 200 writes, each started by the previous
    one's completion, all land."""
    _, _, uri = served(base)
    done = threading.Event()
    errors = []
    with NbdFile(uri) as f:

        def step(i):
            fut = f.submit_write(i * 512, [bytes([i % 251]) * 512])

            def next_one(fu):
                if fu.exception() is not None:
                    errors.append(fu.exception())
                    done.set()
                elif i + 1 < 200:
                    step(i + 1)
                else:
                    done.set()

            fut.add_done_callback(next_one)

        step(0)
        assert done.wait(60) and not errors
        buf = bytearray(200 * 512)
        f.submit_read(0, [buf]).result()
    assert bytes(buf) == b"".join(bytes([i % 251]) * 512 for i in range(200))


def test_reads_longer_than_the_maximum_payload_are_split(served, base):
    _, _, uri = served(base)
    with NbdFile(uri) as f:
        f.max_payload = 64 << 10
        buf = bytearray(MiB + 512)
        f.submit_read(0, [buf]).result()
        with open(base, "rb") as src:
            assert bytes(buf) == src.read(MiB + 512)


def test_open_image_on_a_uri_is_raw_and_takes_no_lock(served, base):
    _, _, uri = served(base, read_only=True, shared=2)
    with vblock.open_image(uri) as img, vblock.open_image(uri) as again:
        assert img.format == "raw" and img.lock is None and again.size == 8 * MiB
        with open(base, "rb") as src:
            assert img.read(123, 4567) == src.read()[123 : 123 + 4567]


def test_server_error_arrives_as_oserror_with_its_errno(served, base):
    _, _, uri = served(base, read_only=True)
    with NbdFile(uri) as f:
        with pytest.raises(OSError) as exc:
            f.submit_write(0, [b"x"]).result()
        assert (
            exc.value.errno == errno.EPERM
            and "read-only" in str(exc.value)
            and uri in str(exc.value)
        )


def test_unknown_export_is_enoent_with_the_servers_words(served, base):
    _, sock, _ = served(base, export_name="disk")
    with pytest.raises(FileNotFoundError, match="export 'nope' not present"):
        NbdFile(f"nbd+unix:///nope?socket={sock}")


def test_nothing_listening_is_a_clear_oserror(scratch):
    with pytest.raises(OSError, match="cannot connect to the NBD server"):
        vblock.open_image(f"nbd+unix:///?socket={scratch / 'none.sock'}")


def test_qed_read_write_on_an_export_is_refused_clearly(served, base):
    _, _, uri = served(base)
    with pytest.raises(UnsupportedError, match="cannot be opened read-write"):
        vblock.open_image(uri, format="qed")


def test_tcp_on_localhost_serves_and_connects(base):
    import threading as th

    from vblock.nbd.server import Server

    img = vblock.open_image(str(base), format="raw", read_only=True, cache="writeback")
    srv = Server("127.0.0.1:0", img, export_name="tcp")
    t = th.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        assert srv.address.port > 0
        with vblock.open_image(f"nbd://127.0.0.1:{srv.address.port}/tcp") as remote:
            with open(base, "rb") as src:
                assert remote.read(MiB - 10, 20) == src.read()[MiB - 10 : MiB + 10]
    finally:
        srv.stop()
        t.join(60)
        img.close()


def test_qed_image_on_an_export_opens_read_only(served, scratch):
    """A QED file exported as raw bytes opens as QED read-only through the network."""
    path = scratch / "img.qed"
    with vblock.create_image(str(path), "qed", 4 * MiB) as img:
        img.write(70000, b"over the wire")
    _, _, uri = served(path, fmt="raw", read_only=True)
    with vblock.open_image(uri, format="qed", read_only=True) as img:
        assert img.read(70000, 13) == b"over the wire" and img.format == "qed"


def test_dropped_connection_fails_requests_in_flight_and_later(scratch):
    """A server that takes a READ and vanishes: the READ fails with ECONNRESET, its buffer is
    untouched, and later requests fail the same way."""
    path = str(scratch / "vanish.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    got = threading.Event()

    def serve():
        conn, _ = listener.accept()
        proto = P.ServerConnection([P.Export("", MiB)])
        conn.sendall(proto.data_to_send())
        while True:
            proto.receive_data(conn.recv(65536))
            ev = proto.next_event()
            conn.sendall(proto.data_to_send())
            if isinstance(ev, P.Command):
                got.set()
                conn.close()  # the request stays unanswered
                return

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    f = NbdFile(f"nbd+unix:///?socket={path}")
    try:
        buf = bytearray(b"\xee" * 512)
        fut = f.submit_read(0, [buf])
        with pytest.raises(ConnectionResetError, match="NBD server closed the connection"):
            fut.result(30)
        assert got.is_set() and bytes(buf) == b"\xee" * 512
        with pytest.raises(ConnectionResetError, match="NBD server closed the connection"):
            f.submit_write(0, [b"x"]).result(30)
    finally:
        f.close()
        listener.close()
        t.join(30)


def test_qed_overlay_on_a_vblock_export_keeps_writes_local(served, base, scratch):
    before = digest(base)
    _, _, uri = served(base, read_only=True)
    ov = scratch / "ov.qed"
    vblock.create_image(str(ov), "qed", 8 * MiB, backing_file=uri, backing_fmt="raw").close()
    with vblock.open_image(str(ov)) as img:
        img.write(4096, b"local")
        with open(base, "rb") as src:
            data = src.read(MiB)
        assert img.read(0, 8192) == data[:4096] + b"local" + data[4101:8192]
    assert digest(base) == before


# -- the CLI ---------------------------------------------------------------------------------------
def vb(*argv):
    return subprocess.run(
        [sys.executable, "-m", "vblock.cli.main", *map(str, argv)],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_info_map_convert_compare_on_a_uri(served, base, scratch):
    _, _, uri = served(base, read_only=True, shared=0)
    r = vb("info", uri)
    assert r.returncode == 0 and "file format: raw" in r.stdout and "8 MiB" in r.stdout
    out = scratch / "copy.raw"
    r = vb("convert", "-O", "raw", uri, out)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(base)
    assert os.stat(out).st_blocks * 512 < 2 * MiB  # the holes stayed holes
    assert vb("compare", uri, base).returncode == 0


def test_cli_refuses_a_qed_image_on_an_export_read_write(served, base):
    _, _, uri = served(base)
    r = vb("resize", "-f", "qed", uri, "16M")
    assert r.returncode == 1 and r.stderr.startswith("vblock: error: ") and "read-write" in r.stderr


def test_serve_an_nbd_uri_again(served, base, scratch):
    """``vblock serve``'s image may itself be a URI (a relay)."""
    _, _, uri = served(base, read_only=True)
    sock2 = scratch / "relay.sock"
    with subprocess.Popen(  # leaving the block closes the stderr pipe and reaps the process
        [sys.executable, "-m", "vblock.cli.main", "serve", "--nbd", str(sock2), "--read-only", uri],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert "on nbd" in proc.stderr.readline()
            with vblock.open_image(f"nbd+unix:///?socket={sock2}") as img, open(base, "rb") as src:
                assert img.read(0, 4096) == src.read(4096)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


# -- interop as a client: qemu-nbd and nbdkit ------------------------------------------------------
@pytest.fixture
def daemons():
    """``start(argv, pidfile)`` runs a forking server (qemu-nbd --fork: its pid file is written
    before the parent returns); ``captive(argv)`` runs nbdkit with ``--run``, whose command says
    "ready" once nbdkit listens and lasts until the test ends. All stop at the end."""
    pids, procs = [], []

    def start(argv, pidfile):
        subprocess.run(argv, check=True, capture_output=True, timeout=60)
        with open(pidfile) as f:
            pids.append(int(f.read()))

    def captive(argv):
        proc = subprocess.Popen(
            argv + ["--run", "echo ready; exec cat >/dev/null"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline() == "ready\n"

    start.captive = captive
    yield start
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.stdin.close()  # cat ends, and nbdkit with it
        proc.wait(60)
        proc.stdout.close()


def test_convert_from_qemu_nbd_is_exact_and_sparse(daemons, base, scratch):
    need("qemu-nbd")
    sock, pid = scratch / "q.sock", scratch / "q.pid"
    daemons(
        [
            "qemu-nbd",
            "--fork",
            "--pid-file",
            str(pid),
            "-t",
            "-r",
            "-f",
            "raw",
            "-k",
            str(sock),
            str(base),
        ],
        pid,
    )
    out = scratch / "out.raw"
    r = vb("convert", "-O", "raw", f"nbd+unix:///?socket={sock}", out)
    assert r.returncode == 0, r.stderr
    assert digest(out) == digest(base) and os.stat(out).st_blocks * 512 < 2 * MiB


def test_convert_from_nbdkit_memory_is_exact(daemons, scratch):
    need("nbdkit", "qemu-io")
    sock = scratch / "k.sock"
    daemons.captive(["nbdkit", "-U", str(sock), "memory", "16M"])
    uri = f"nbd+unix:///?socket={sock}"
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "raw",
            "-c",
            "write -P 0x3c 1000 70000",
            "-c",
            "write -P 0x11 9M 4k",
            uri,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    out = scratch / "mem.raw"
    r = vb("convert", "-O", "raw", uri, out)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        data = f.read()
    expect = bytearray(16 * MiB)
    expect[1000:71000] = b"\x3c" * 70000
    expect[9 * MiB : 9 * MiB + 4096] = b"\x11" * 4096
    assert data == bytes(expect)


def test_qed_overlay_on_qemu_nbd_backing_reads_base_and_writes_locally(daemons, base, scratch):
    need("qemu-nbd", "qemu-img")
    before = digest(base)
    sock, pid = scratch / "q.sock", scratch / "q.pid"
    daemons(
        [
            "qemu-nbd",
            "--fork",
            "--pid-file",
            str(pid),
            "-t",
            "-r",
            "-e",
            "0",
            "-f",
            "raw",
            "-k",
            str(sock),
            str(base),
        ],
        pid,
    )
    uri = f"nbd+unix:///?socket={sock}"
    ov = scratch / "ov.qed"
    assert vb("create", "-f", "qed", "-b", uri, "-F", "raw", ov).returncode == 0
    with vblock.open_image(str(ov)) as img:
        img.write(MiB - 100, b"\xab" * 200)  # a partial cluster: copy-on-write from the network
        with open(base, "rb") as src:
            data = src.read(MiB)
        assert img.read(0, MiB + 100) == data[: MiB - 100] + b"\xab" * 200
    assert digest(base) == before
    r = subprocess.run(
        ["qemu-img", "check", "-f", "qed", str(ov)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_nbdkit_error_filter_eio_reaches_the_request_and_loses_nothing(daemons, scratch):
    need("nbdkit")
    sock, flag = scratch / "e.sock", scratch / "fail-now"
    daemons.captive(
        [
            "nbdkit",
            "-U",
            str(sock),
            "--filter=error",
            "memory",
            "8M",
            "error=EIO",
            "error-pread-rate=100%",
            f"error-file={flag}",
        ]
    )
    uri = f"nbd+unix:///?socket={sock}"
    with vblock.open_image(uri) as img:
        img.write(0, b"\x42" * 65536)
    ov = scratch / "ov.qed"
    vblock.create_image(str(ov), "qed", 8 * MiB, backing_file=uri, backing_fmt="raw").close()
    with vblock.open_image(str(ov)) as img:
        img.write(MiB, b"\x07" * 65536)  # a whole cluster: no backing read needed
        flag.touch()
        buf = bytearray(b"\xee" * 4096)
        with pytest.raises(OSError) as exc:
            img.readinto(0, buf)
        assert exc.value.errno == errno.EIO
        assert bytes(buf) == b"\xee" * 4096 or bytes(buf) == b"\x42" * 4096  # never wrong data
        assert img.read(MiB, 65536) == b"\x07" * 65536  # local clusters still read
        flag.unlink()
        assert img.read(0, 4096) == b"\x42" * 4096
    with vblock.open_image(str(ov), read_only=True) as img:
        assert img.read(MiB, 65536) == b"\x07" * 65536
        assert img.check()["corruptions"] == 0


def test_stress_runs_on_an_nbd_image(served, scratch):
    path = scratch / "stress.raw"
    with open(path, "wb") as f:
        f.truncate(16 * MiB)
    _, _, uri = served(path, shared=0)
    r = vb("stress", "--duration", "1", "--queues", "2", "--image", uri, "--format", "raw")
    assert r.returncode == 0 and "mismatches       0" in r.stdout and "PASS" in r.stdout, (
        r.stdout + r.stderr
    )

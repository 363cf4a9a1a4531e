"""The NBD server: vblock's own protocol client and hostile byte streams against a served image,
then interop with qemu-io, qemu-img and nbdinfo (skipped when they are missing)."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys

import pytest

import vblock
from tests.files import digest
from tests.nbd.nbd_helpers import TestClient, need
from vblock.nbd import protocol as P
from vblock.nbd.protocol import Cmd

MiB = 1 << 20
QED_F_NEED_CHECK = 0x02  # QED header features bit: the image was not closed cleanly


@pytest.fixture
def raw(scratch):
    path = scratch / "disk.raw"
    with open(path, "wb") as f:
        f.write(bytes(range(256)) * 4096)  # 1 MiB of a known pattern
        f.truncate(4 * MiB)
    return path


def test_read_write_flush_through_the_block_layer(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        assert c.ready.export.size == 4 * MiB
        assert c.read(3, 5) == bytes(range(3, 8))
        assert c.write(1000, b"hello", flags=P.CMD_FLAG_FUA).error == 0
        c.send(Cmd.FLUSH)
        assert c.reply().error == 0
        assert c.read(998, 9) == bytes([230, 231]) + b"hello" + bytes([237, 238])
    with open(raw, "rb") as f:
        f.seek(1000)
        assert f.read(5) == b"hello"


def test_many_requests_in_flight_all_answered(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        bufs = {}
        for i in range(32):
            buf = bytearray(4096)
            bufs[c.send(Cmd.READ, i * 4096, 4096, buffer=buf)] = (i, buf)
        done = {c.reply().cookie for _ in range(32)}
    assert done == set(bufs)
    assert all(bytes(buf) == bytes(range(256)) * 16 for _, buf in bufs.values())


def test_block_status_reports_data_and_holes(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        c.send(Cmd.BLOCK_STATUS, 0, 4 * MiB)
        ev = c.reply()
    assert ev.extents == {1: ((MiB, 0), (3 * MiB, P.STATE_HOLE | P.STATE_ZERO))}


def test_trim_and_write_zeroes_read_back_zeros(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        c.send(Cmd.WRITE_ZEROES, 100, 200, P.CMD_FLAG_NO_HOLE)
        assert c.reply().error == 0
        c.send(Cmd.TRIM, 65536, 65536)
        assert c.reply().error == 0
        assert c.read(99, 202) == bytes([99]) + bytes(200) + bytes([44])
        assert c.read(65536, 65536) == bytes(65536)


def test_read_only_export_refuses_writes_with_eperm(served, raw):
    before = digest(raw)
    _, sock, _ = served(raw, read_only=True)
    with TestClient(sock) as c:
        assert c.ready.flags & P.TF_READ_ONLY
        assert c.write(0, b"x").error == P.NBD_EPERM
        assert c.read(0, 4) == bytes(range(4))
    assert digest(raw) == before


def test_export_name_is_served_and_others_refused(served, raw):
    _, sock, _ = served(raw, export_name="disk0")
    with TestClient(sock, export="nope") as c:
        assert isinstance(c.ready, P.Refused) and c.ready.reply_type == P.ERR_UNKNOWN
        assert "export 'nope' not present" in c.ready.message
    with TestClient(sock, export="disk0") as c:
        assert c.read(0, 2) == b"\0\1"


def test_two_clients_at_once_share_one_image(served, raw):
    _, sock, _ = served(raw, shared=2)
    with TestClient(sock) as a, TestClient(sock) as b:
        assert a.ready.flags & P.TF_CAN_MULTI_CONN and b.ready.flags & P.TF_CAN_MULTI_CONN
        assert a.write(4096, b"from a").error == 0
        a.send(Cmd.FLUSH)
        assert a.reply().error == 0
        assert b.read(4096, 6) == b"from a"


def test_single_connection_export_has_no_multi_conn(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        assert not c.ready.flags & P.TF_CAN_MULTI_CONN


# -- hostile clients: one named test each ----------------------------------------------------------
def test_client_disconnecting_mid_write_leaves_the_image_and_server_intact(served, raw):
    before = digest(raw)
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        c.sock.sendall(P.encode_request(Cmd.WRITE, 1, 0, 8192) + b"\xee" * 4000)
    with TestClient(sock) as d:  # served once the first connection is gone (shared=1)
        assert d.read(0, 4) == bytes(range(4))
    assert digest(raw) == before


def test_garbage_after_the_handshake_closes_that_connection_only(served, raw):
    before = digest(raw)
    _, sock, _ = served(raw, shared=2)
    with TestClient(sock) as other, TestClient(sock) as c:
        assert c.raw(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(64)) == b""
        assert other.read(0, 4) == bytes(range(4))
    assert digest(raw) == before


def test_garbage_instead_of_a_handshake_closes_the_connection(served, raw):
    import socket as s

    _, sock, _ = served(raw)
    with s.socket(s.AF_UNIX, s.SOCK_STREAM) as c:
        c.connect(str(sock))
        c.recv(18)
        c.sendall(b"\xff" * 100)
        c.settimeout(30)
        assert c.recv(100) == b""
    with TestClient(sock) as c:
        assert c.read(0, 1) == b"\0"


def test_huge_read_length_is_einval_and_the_connection_lives(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        c.send(Cmd.READ, 0, (32 * MiB) + 1, buffer=bytearray(32 * MiB + 1))
        ev = c.reply()
        assert ev.error == P.NBD_EINVAL and "over the maximum" in ev.message
        assert c.read(0, 2) == b"\0\1"


def test_huge_write_length_is_einval_then_closed(served, raw):
    before = digest(raw)
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        c.sock.sendall(P.encode_request(Cmd.WRITE, 77, 0, 64 * MiB) + b"\xee" * 1000)
        c.expect(77)
        ev = c.reply()
        assert (ev.cookie, ev.error) == (77, P.NBD_EINVAL)
        assert c.recv_all() == b""
    assert digest(raw) == before


def test_write_past_the_end_is_refused_and_nothing_grows(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        assert c.write(4 * MiB - 2, b"abcd").error == P.NBD_ENOSPC
    assert os.path.getsize(raw) == 4 * MiB


def test_unknown_command_is_einval_and_the_connection_lives(served, raw):
    _, sock, _ = served(raw)
    with TestClient(sock) as c:
        c.sock.sendall(P.encode_request(9, 500, 0, 33 * MiB))
        c.expect(500)
        ev = c.reply()
        assert (ev.cookie, ev.error) == (500, P.NBD_EINVAL)
        assert "invalid request type 9" in ev.message
        assert c.read(0, 1) == b"\0"


def test_eof_in_the_handshake_is_harmless(served, raw):
    import socket as s

    _, sock, _ = served(raw)
    with s.socket(s.AF_UNIX, s.SOCK_STREAM) as c:
        c.connect(str(sock))
        c.recv(18)
        c.sendall(b"\0\0")
    with TestClient(sock) as c:
        assert c.read(0, 1) == b"\0"


def test_client_silent_in_the_handshake_is_dropped_and_the_slot_freed(served, raw):
    import socket as s

    _, sock, _ = served(raw, handshake_timeout=2)
    with s.socket(s.AF_UNIX, s.SOCK_STREAM) as c:
        c.connect(str(sock))
        assert len(c.recv(18)) == 18
        c.settimeout(60)
        assert c.recv(100) == b""  # the server closed: it waits for no handshake forever
        with TestClient(sock) as again:
            assert again.read(0, 1) == b"\0"  # shared=1: the slot is free again


# -- the CLI: locks while served, SIGTERM drains and leaves QED clean ------------------------------
def test_serve_nbd_sigterm_leaves_qed_clean_and_locked_while_served(scratch):
    path = scratch / "d.qed"
    vblock.create_image(str(path), "qed", 8 * MiB).close()
    sock = scratch / "s.sock"
    with subprocess.Popen(  # leaving the block closes the stderr pipe and reaps the process
        [sys.executable, "-m", "vblock.cli.main", "serve", "--nbd", str(sock), str(path)],
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            line = proc.stderr.readline()
            assert "on nbd" in line
            with TestClient(sock) as c:
                assert c.write(12345, b"kept").error == 0
                with pytest.raises(vblock.errors.ImageLockedError):
                    vblock.open_image(str(path), read_only=True)
                proc.send_signal(signal.SIGTERM)  # with the client still connected
                assert proc.wait(60) == 0
                assert c.recv_all() == b""
        finally:
            if proc.poll() is None:
                proc.kill()
    assert not sock.exists()
    with open(path, "rb") as f:
        assert struct.unpack_from("<Q", f.read(64), 16)[0] & QED_F_NEED_CHECK == 0
    with vblock.open_image(str(path), read_only=True) as img:
        assert img.read(12345, 4) == b"kept"
        assert img.check()["corruptions"] == 0 and img.check()["leaks"] == 0


def test_serve_needs_exactly_one_of_nbd_and_vhost_user(scratch):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "vblock.cli.main",
            "serve",
            "--nbd",
            "x/s",
            "--vhost-user",
            "y",
            "img",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 1 and "not allowed with argument" in r.stderr


# -- interop as a server ---------------------------------------------------------------------------
def qemu_io(uri, *cmds, ro=False):
    argv = ["qemu-io", "-f", "raw"] + (["-r"] if ro else [])
    for c in cmds:
        argv += ["-c", c]
    return subprocess.run(argv + [uri], capture_output=True, text=True, timeout=120)


def test_qemu_io_patterns_at_unaligned_offsets_zero_and_discard(served, scratch):
    need("qemu-io")
    path = scratch / "q.qed"
    vblock.create_image(str(path), "qed", 16 * MiB).close()
    _, _, uri = served(path, fmt="qed")
    r = qemu_io(
        uri,
        "write -P 0x5a 1000 3000",
        "write -P 0x33 65535 70000",
        "write -z 8M 64k",
        "discard 12M 64k",
        "read -P 0x5a 1000 3000",
        "read -P 0x33 65535 70000",
        "read -P 0 8M 64k",
        "read -P 0 999 1",
    )
    assert r.returncode == 0 and "Pattern verification failed" not in r.stdout, r.stdout + r.stderr


def _merged(entries):
    out = []
    for e in entries:
        key = (bool(e["data"]), bool(e["zero"]))
        if out and out[-1][2] == key and out[-1][0] + out[-1][1] == e["start"]:
            out[-1][1] += e["length"]
        else:
            out.append([e["start"], e["length"], key])
    return out


def test_qemu_img_map_over_the_uri_equals_the_image_map(served, scratch):
    need("qemu-img", "qemu-io")
    path = scratch / "m.qed"
    subprocess.run(
        ["qemu-img", "create", "-f", "qed", str(path), "64M"], check=True, capture_output=True
    )
    subprocess.run(
        [
            "qemu-io",
            "-f",
            "qed",
            "-c",
            "write 0 1M",
            "-c",
            "write -z 4M 64k",
            "-c",
            "write 8M 64k",
            str(path),
        ],
        check=True,
        capture_output=True,
    )
    own = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "qed", str(path)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    _, _, uri = served(path, fmt="qed", read_only=True)
    remote = json.loads(
        subprocess.run(
            ["qemu-img", "map", "--output=json", "-f", "raw", uri],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    )
    assert _merged(remote) == _merged(own)


def test_nbdinfo_map_shows_data_and_holes(served, raw):
    need("nbdinfo")
    _, _, uri = served(raw, read_only=True)
    r = subprocess.run(["nbdinfo", "--map", uri], capture_output=True, text=True, timeout=60)
    rows = [line.split() for line in r.stdout.splitlines()]
    assert r.returncode == 0 and [row[:3] for row in rows] == [
        ["0", str(MiB), "0"],
        [str(MiB), str(3 * MiB), "3"],
    ]


def test_qemu_io_two_clients_at_once(served, raw):
    need("qemu-io")
    _, sock, uri = served(raw, shared=2)
    with TestClient(sock) as held:  # the first connection stays open while qemu-io works
        r = qemu_io(uri, "write -P 0x77 2048 512", "read -P 0x77 2048 512")
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        assert held.read(2048, 512) == b"\x77" * 512


def test_qemu_io_export_name_and_unknown_export(served, raw):
    need("qemu-io")
    _, sock, uri = served(raw, export_name="disk0", shared=0)
    assert qemu_io(uri, "read -P 0 2M 4k").returncode == 0
    bad = qemu_io(f"nbd+unix:///other?socket={sock}", "read 0 512")
    assert bad.returncode != 0 and "export 'other' not present" in bad.stderr


def test_qemu_io_read_only_export_refuses_writes(served, raw):
    need("qemu-io")
    before = digest(raw)
    _, _, uri = served(raw, read_only=True, shared=0)
    r = qemu_io(uri, "write 0 512", ro=False)
    assert r.returncode == 1 and "Permission denied" in r.stderr  # QEMU sees the READ_ONLY flag
    assert qemu_io(uri, "read -P 0 2M 512", ro=True).returncode == 0
    assert digest(raw) == before

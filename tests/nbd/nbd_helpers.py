"""Helpers for the NBD tests: a small blocking client made of the protocol core and a socket (for
the tests that must send exactly the bytes they choose), tool checks and checksums."""

from __future__ import annotations

import shutil
import socket

import pytest

from vblock.nbd import protocol as P


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (apt: qemu-utils, nbdkit, libnbd-bin)")


class TestClient:
    """A blocking NBD client for tests: handshake with ``ClientConnection``, then raw requests."""

    __test__ = False

    def __init__(self, path, export="", structured=True):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.proto = P.ClientConnection(export, structured=structured)
        self.ready = None
        self._cookie = 0
        try:
            self.sock.connect(str(path))
            while self.ready is None:
                ev = self._event()
                if isinstance(ev, P.Refused):
                    self.ready = ev
                elif isinstance(ev, P.Ready):
                    self.ready = ev
        except BaseException:
            self.sock.close()
            raise

    def _event(self):
        while True:
            ev = self.proto.next_event()
            out = self.proto.data_to_send()
            if out:
                self.sock.sendall(out)
            if ev is not P.NEED_DATA:
                return ev
            self.proto.receive_data(self.sock.recv(1 << 20))

    def send(self, kind, offset=0, length=0, flags=0, data=None, buffer=None):
        self._cookie += 1
        self.sock.sendall(
            b"".join(
                bytes(b)
                for b in self.proto.request(
                    kind, self._cookie, offset, length, flags, data=data, buffer=buffer
                )
            )
        )
        return self._cookie

    def expect(self, cookie, kind=P.Cmd.FLUSH):
        """Await a reply to a request sent as raw bytes (not through the core)."""
        self.proto._pending[cookie] = P._Pending(kind, 0, 0, None)

    def reply(self):
        return self._event()

    def read(self, offset, length):
        buf = bytearray(length)
        self.send(P.Cmd.READ, offset, length, buffer=buf)
        ev = self.reply()
        assert ev.error == 0, ev
        return bytes(buf)

    def write(self, offset, data, flags=0):
        self.send(P.Cmd.WRITE, offset, len(data), flags, data=data)
        return self.reply()

    def raw(self, data):
        """Send bytes the core did not make; returns what the server answered (b"" on close)."""
        self.sock.sendall(data)
        return self.recv_all()

    def recv_all(self):
        self.sock.settimeout(30)
        try:
            return self.sock.recv(1 << 16)
        except ConnectionResetError:
            return b""

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

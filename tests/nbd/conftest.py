"""Fixtures for the NBD tests: a server on an image, in a thread."""

from __future__ import annotations

import threading

import pytest

import vblock
from vblock.nbd.server import Server


@pytest.fixture
def served(scratch):
    """``start(path, fmt="raw", read_only=False, **server_kwargs)`` serves an image on a unix socket
    in a thread and returns (server, socket path, uri); everything stops at the end of the test."""
    running = []

    def start(path, fmt="raw", read_only=False, image_kwargs=None, **kw):
        img = vblock.open_image(
            str(path), format=fmt, read_only=read_only, cache="writeback", **(image_kwargs or {})
        )
        sock = scratch / f"nbd{len(running)}.sock"
        srv = Server(str(sock), img, **kw)
        t = threading.Thread(target=srv.serve_forever, daemon=True)
        t.start()
        running.append((srv, t, img))
        name = kw.get("export_name", "")
        return srv, sock, f"nbd+unix:///{name}?socket={sock}"

    yield start
    for srv, t, img in running:
        srv.stop()
        t.join(60)
        img.close()

"""Listening sockets for vblock's servers (vhost-user, NBD): one rule for a socket path.

``listen_unix(path)`` takes over a unix socket path the way a restarted daemon should: a socket
file nobody accepts on any more (left by a server that died) is replaced; a live one, or a file
that is not a socket, is an error and is left alone. ``listen_tcp(host, port)`` binds with
SO_REUSEADDR. Errors are ``OSError`` with the errno, naming the path or ``host:port``.
"""

from __future__ import annotations

import errno
import os
import socket
import stat

__all__ = ["listen_tcp", "listen_unix"]


def listen_unix(path: str, backlog: int = 1) -> socket.socket:
    """A listening unix stream socket at ``path`` (see the module docstring)."""
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
    return _bound(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM), path, path, backlog)


def listen_tcp(host: str, port: int, backlog: int = 16) -> socket.socket:
    """A listening TCP socket on ``host:port`` (IPv6 when the host has a colon)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    return _bound(sock, (host, port), f"{host}:{port}", backlog)


def _bound(sock: socket.socket, target, where: str, backlog: int) -> socket.socket:
    try:
        sock.bind(target)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise type(exc)(exc.errno, exc.strerror, where) from None  # name the path or address
    except BaseException:
        sock.close()
        raise
    return sock

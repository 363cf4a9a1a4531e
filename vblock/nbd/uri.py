"""NBD URIs in QEMU's syntax, and server addresses.

* ``nbd+unix:///EXPORT?socket=PATH``: a unix socket; the export is the path without its leading
  ``/``, percent-decoded ("" when empty). A host, a port or any parameter but ``socket`` is refused.
* ``nbd://HOST[:PORT]/EXPORT`` (also ``nbd+tcp://``): TCP; the host is required, the port defaults
  to 10809, the export to "".

``parse_uri`` raises ``ValueError`` with the reason for anything else that starts with ``nbd``.
"""

from __future__ import annotations

import dataclasses
import urllib.parse

__all__ = ["NbdAddress", "DEFAULT_PORT", "is_nbd_uri", "parse_uri", "parse_address"]

DEFAULT_PORT = 10809
_SCHEMES = ("nbd://", "nbd+tcp://", "nbd+unix://")


@dataclasses.dataclass(frozen=True)
class NbdAddress:
    """Where an export lives: ``socket`` (a unix socket path) or ``host``/``port``; and the
    ``export`` name."""

    export: str = ""
    socket: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT

    def uri(self) -> str:
        name = urllib.parse.quote(self.export)
        if self.socket is not None:
            return f"nbd+unix:///{name}?socket={urllib.parse.quote(self.socket, safe='/')}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{name}"

    def __str__(self):
        return self.uri()


def is_nbd_uri(name) -> bool:
    """Whether an image name is an NBD URI (``nbd://``, ``nbd+tcp://`` or ``nbd+unix://``)."""
    return isinstance(name, str) and name.startswith(_SCHEMES)


def parse_uri(uri: str) -> NbdAddress:
    """The ``NbdAddress`` an NBD URI names; ``ValueError`` saying what is wrong otherwise."""
    if not is_nbd_uri(uri):
        raise ValueError(
            f"{uri!r} is not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)"
        )
    if any(c.isspace() for c in uri):
        raise ValueError(f"{uri!r}: an NBD URI cannot hold white space (percent-encode it)")
    u = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if u.fragment:
        raise ValueError(f"{uri!r}: an NBD URI has no fragment")
    if u.scheme == "nbd+unix":
        if u.netloc:
            raise ValueError(
                f"{uri!r}: nbd+unix takes no host or port (nbd+unix:///EXPORT?socket=PATH)"
            )
        params = urllib.parse.parse_qsl(u.query, keep_blank_values=True)
        if len(params) != 1 or params[0][0] != "socket" or not params[0][1]:
            raise ValueError(f"{uri!r}: nbd+unix needs exactly one parameter, socket=PATH")
        return NbdAddress(export=export, socket=params[0][1])
    if u.query:
        raise ValueError(f"{uri!r}: nbd:// takes no parameters")
    try:
        host, port = u.hostname, u.port
    except ValueError as exc:
        raise ValueError(f"{uri!r}: {exc}") from None
    if not host:
        raise ValueError(f"{uri!r}: nbd:// needs a host (nbd://HOST:PORT/EXPORT)")
    return NbdAddress(export=export, host=host, port=DEFAULT_PORT if port is None else port)


def parse_address(address: str) -> NbdAddress:
    """A server address: a unix socket path (anything containing ``/``) or ``HOST:PORT`` (port 0:
    any free port, which the server then reports)."""
    if "/" in address:
        return NbdAddress(socket=address)
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(
            f"NBD address {address!r} is neither a socket path (containing '/') nor HOST:PORT"
        )
    return NbdAddress(host=host.strip("[]"), port=int(port))

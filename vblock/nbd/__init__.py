"""vblock on the network: the NBD protocol (newstyle fixed handshake, structured replies,
``base:allocation``), a server that exports an ``Image`` and a client that is a host-I/O backend.

* ``protocol``: the sans-I/O core for both sides (bytes in, events out; no sockets, no threads),
  gathered from its parts: ``wire`` (constants, struct layouts, encoders), ``events`` (what
  the state machines hand their caller), ``server_protocol`` and ``client_protocol``.
* ``uri``: NBD URIs in QEMU's syntax (``nbd+unix:///EXPORT?socket=PATH``, ``nbd://HOST:PORT/EXPORT``).
* ``server``: ``Server`` serves one open ``Image`` on a unix socket or TCP address.
* ``client``: ``NbdFile`` speaks to an export with the asynchronous interface of ``HostFile``.

TLS is not supported: STARTTLS is refused with ERR_POLICY and the client never asks for it.
"""

from .uri import NbdAddress, is_nbd_uri, parse_uri

__all__ = ["NbdAddress", "is_nbd_uri", "parse_uri"]

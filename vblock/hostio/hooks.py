"""Seams for fault injection: how drivers open host files, and named I/O points.

Drivers open their files with ``open_host_file(path, **HostFile kwargs)`` instead of calling
``HostFile`` directly, so that ``vblock.testing.faults`` can substitute a fault-injecting file for
a test (``host_file_opener``). Metadata writes are announced with ``io_point("L2_UPDATE")`` (a
block) or ``announce("L2_UPDATE")`` (until the next announcement) so that faults can strike a
named step of a format's write order. Both cost next to nothing when unused.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

from .file import HostFile

_opener = HostFile
_NBD_SCHEMES = ("nbd://", "nbd+tcp://", "nbd+unix://")
_opener_lock = threading.Lock()
_points = threading.local()


def open_host_file(path: str | os.PathLike, **kwargs: Any) -> HostFile:
    """Open ``path`` with the current opener (``HostFile`` unless a test installed another). An
    NBD URI opens a connection to the export instead (``vblock.nbd.client.NbdFile``, the same
    asynchronous interface), whatever the opener."""
    if isinstance(path, str) and path.startswith(_NBD_SCHEMES):
        from vblock.nbd.client import NbdFile  # a network host: same interface, loaded on use

        return NbdFile(path, **kwargs)
    return _opener(path, **kwargs)


@contextlib.contextmanager
def host_file_opener(factory: Callable[..., Any]) -> Iterator[None]:
    """Use ``factory(path, **kwargs)`` for every ``open_host_file`` call while active (called on
    the thread that calls ``open_host_file``)."""
    global _opener
    with _opener_lock:
        previous, _opener = _opener, factory
    try:
        yield
    finally:
        with _opener_lock:
            _opener = previous


@contextlib.contextmanager
def io_point(name: str) -> Iterator[None]:
    """Announce that I/O issued by this thread inside the block belongs to step ``name``."""
    previous = getattr(_points, "name", None)
    _points.name = name
    try:
        yield
    finally:
        _points.name = previous


def announce(name: str | None) -> None:
    """Label the I/O this thread issues from now on (until the next label) as step ``name``;
    for drivers whose named steps are not lexical blocks."""
    _points.name = name


def current_io_point() -> str | None:
    """The innermost ``io_point`` name active in this thread, or None."""
    return getattr(_points, "name", None)

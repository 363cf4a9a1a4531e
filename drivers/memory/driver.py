"""A RAM disk: the guest disk is a ``bytearray`` in this process.

``vblock.open_image(None, format="memory", size=N)`` (or ``path=""``) makes a fresh, private RAM
disk of N bytes. A non-empty path names a process-wide RAM disk instead: ``create_image(name,
"memory", N)`` makes (or empties) it and every ``open_image(name, format="memory")`` shares its
bytes until ``forget(name)``. Requests complete before ``submit_*`` returns. Discard and
write_zeroes both zero the range; flush does nothing.
"""

from __future__ import annotations

import errno
import threading

from vblock.block.interface import DATA, BlockDriver, Limits, Run
from vblock.errors import UnknownOptionError
from vblock.future import completed

__all__ = ["MemoryDriver", "forget"]

_ZEROS = bytes(1 << 20)


def _size(value) -> int:
    value = int(value)
    if value < 0:
        raise ValueError("size must not be negative")
    return value


class _Store:
    """The bytes of one RAM disk and the lock that guards resizing them.

    ``view`` is a long-lived memoryview of ``data`` (no view per request); ``truncate`` releases
    it, resizes ``data`` and makes a new one, all under ``lock``. Copies happen under the lock too:
    each one is a single memcpy, and holding the lock makes every request atomic per request.
    """

    __slots__ = ("data", "view", "lock")

    def __init__(self, size: int):
        self.data = bytearray(size)
        self.view = memoryview(self.data)
        self.lock = threading.Lock()


_named: dict = {}
_named_lock = threading.Lock()


def forget(name: str) -> None:
    """Drop the named RAM disk (open images keep their bytes until closed)."""
    with _named_lock:
        _named.pop(name, None)


class MemoryDriver(BlockDriver):
    format_name = "memory"
    file_backed = False  # no host file, so no image locks
    open_options = {"size": _size}
    create_options = {}

    def __init__(self, path, store: _Store, read_only: bool):
        self.path = path
        self.read_only = read_only
        self.limits = Limits()
        self._store = store

    @property
    def size(self) -> int:
        return len(self._store.data)

    @classmethod
    def create(cls, path, size, options):
        if path:
            with _named_lock:
                _named[path] = _Store(size)

    @classmethod
    def open(cls, path, options):
        size = options.driver_options.get("size")
        if not path:
            if size is None:
                raise UnknownOptionError("size", "a memory image without a name needs size=")
            return cls(None, _Store(size), options.read_only)
        with _named_lock:
            store = _named.get(path)
            if store is None:
                if size is None:
                    raise FileNotFoundError(errno.ENOENT, "no memory image of that name", path)
                store = _named[path] = _Store(size)
        return cls(path, store, options.read_only)

    def submit_read(self, offset, buffers):
        store = self._store
        pos = offset
        with store.lock:
            view = store.view
            for b in buffers:
                n = len(b)
                b[:] = view[pos : pos + n]
                pos += n
        return completed(pos - offset)

    def submit_write(self, offset, buffers, fua=False):
        store = self._store
        pos = offset
        with store.lock:
            view = store.view
            for b in buffers:
                n = len(b)
                view[pos : pos + n] = b
                pos += n
        return completed(pos - offset)

    def submit_flush(self):
        return completed(None)

    def _zero(self, offset, length):
        store = self._store
        end = offset + length
        with store.lock:
            view = store.view
            while offset < end:
                n = min(end - offset, len(_ZEROS))
                view[offset : offset + n] = _ZEROS[:n]
                offset += n
        return completed(None)

    def submit_discard(self, offset, length):
        return self._zero(offset, length)

    def submit_write_zeroes(self, offset, length, may_unmap):
        return self._zero(offset, length)

    def block_status(self, offset, length):
        return [Run(offset, length, DATA, offset)]

    def truncate(self, size):
        store = self._store
        with store.lock:
            store.view.release()
            old = len(store.data)
            if size > old:
                store.data.extend(bytes(size - old))
            else:
                del store.data[size:]
            store.view = memoryview(store.data)

    def info(self):
        return {"actual-size": len(self._store.data), "named": bool(self.path)}

    def close(self):
        pass

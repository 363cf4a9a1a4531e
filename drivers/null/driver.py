"""The null driver: a disk of ``size`` bytes (default 1 GiB) that reads zeros and drops writes.

No file: ``vblock.open_image(None, format="null", size=N)``. ``read_zeroes=False`` leaves read
buffers untouched (measures the layers above without even a memset). Requests complete before
``submit_*`` returns.
"""

from __future__ import annotations

from vblock.block.interface import ZERO, BlockDriver, Limits, Run
from vblock.future import completed

__all__ = ["NullDriver"]

_ZEROS = memoryview(bytes(1 << 20))


def _size(value) -> int:
    value = int(value)
    if value < 0:
        raise ValueError("size must not be negative")
    return value


def _bool(value) -> bool:
    if isinstance(value, str):
        low = value.lower()
        if low in ("on", "true", "yes", "1"):
            return True
        if low in ("off", "false", "no", "0"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    return bool(value)


class NullDriver(BlockDriver):
    format_name = "null"
    file_backed = False  # no host file, so no image locks
    open_options = {"size": _size, "read_zeroes": _bool}

    def __init__(self, path, size, read_only, read_zeroes):
        self.path = path
        self.size = size
        self.read_only = read_only
        self.limits = Limits()
        self._read_zeroes = read_zeroes

    @classmethod
    def create(cls, path, size, options):
        pass

    @classmethod
    def open(cls, path, options):
        opts = options.driver_options
        return cls(
            path, opts.get("size", 1 << 30), options.read_only, opts.get("read_zeroes", True)
        )

    def submit_read(self, offset, buffers):
        total = 0
        for b in buffers:
            n = len(b)
            if self._read_zeroes:
                pos = 0
                while pos < n:
                    k = min(n - pos, len(_ZEROS))
                    b[pos : pos + k] = _ZEROS[:k]
                    pos += k
            total += n
        return completed(total)

    def submit_write(self, offset, buffers, fua=False):
        return completed(sum(len(b) for b in buffers))

    def submit_flush(self):
        return completed(None)

    def submit_write_zeroes(self, offset, length, may_unmap):
        return completed(None)

    def block_status(self, offset, length):
        return [Run(offset, length, ZERO)]

    def truncate(self, size):
        self.size = size

    def info(self):
        return {"read-zeroes": self._read_zeroes}

"""A raw driver that lies: every read covering ``FLIP_OFFSET`` comes back with that byte flipped.

Registered as format ``flipraw`` by the tests that need a backend which corrupts data, to prove
that ``vblock stress`` notices and names the offset.
"""

from __future__ import annotations

from vblock.drivers.raw.driver import RawDriver
from vblock.future import Future

FLIP_OFFSET = 3 * 4096 + 700  # inside the stress run's hot region
FORMAT = "flipraw"


class FlipRawDriver(RawDriver):
    format_name = FORMAT

    def __init__(self, path, hostfile, options):
        super().__init__(path, hostfile, options)
        self._read = self.submit_read
        self.submit_read = self._flipping_read

    def _flipping_read(self, offset, buffers):
        fut = self._read(offset, buffers)
        total = sum(len(b) for b in buffers)
        if not offset <= FLIP_OFFSET < offset + total:
            return fut
        out = Future()

        def done(f):
            exc = f.exception()
            if exc is None:
                pos = FLIP_OFFSET - offset
                for b in buffers:
                    if pos < len(b):
                        b[pos] ^= 0x40
                        break
                    pos -= len(b)
                out.set_result(f.result())
            else:
                out.set_exception(exc)

        fut.add_done_callback(done)
        return out

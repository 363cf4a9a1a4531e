"""The raw driver: guest byte ``n`` is host byte ``n`` of a regular file or a device.

Cache modes (``OpenOptions.cache``): ``"none"`` opens the file O_DIRECT (the block layer bounces
what is not aligned to ``limits``); ``"writeback"`` uses the page cache and flush is fdatasync;
``"unsafe"`` uses the page cache and flush does nothing, so data acknowledged as flushed can be
lost if the host crashes (for scratch images and tests only).

A regular file whose size is not a multiple of the O_DIRECT alignment cannot be served O_DIRECT
(its last block would be beyond the end of file), so such a file opened with ``cache="none"``
falls back to the page cache, with a warning; ``info()["direct"]`` says which is in use.

Discard punches a hole (FALLOC_FL_PUNCH_HOLE | KEEP_SIZE); where the host cannot, discard becomes
a no-op and ``info()["discard"]`` says ``"unsupported"``. write_zeroes uses FALLOC_FL_ZERO_RANGE
(or a punched hole when ``may_unmap``); where the host cannot, the driver asks the block layer to
write zero buffers instead. ``block_status`` reports holes (SEEK_HOLE) as ZERO and the rest as
DATA with ``host_offset == offset``.

A character device is served as it is: all DATA, no holes, no zero ranges (zero buffers are
written), and flush does nothing (such devices cannot sync; fdatasync refuses with EINVAL).
``create`` on a device writes in place (see ``RawDriver.create``).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from vblock.block.interface import DATA, ZERO, BlockDriver, Limits, Run
from vblock.errors import UnsupportedError
from vblock.future import Future, completed, followed_by

__all__ = ["RawDriver"]

_log = logging.getLogger(__name__)

_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS)


def _preallocation(value) -> str:
    if value not in ("off", "falloc", "full"):
        raise ValueError("preallocation must be off, falloc or full")
    return value


class RawDriver(BlockDriver):
    format_name = "raw"
    create_options = {"preallocation": _preallocation}
    create_option_help = {
        "preallocation": "preallocation mode: off (sparse), falloc (reserve blocks) or full (write zeros)"
    }
    open_options = {}

    def __init__(self, path, hostfile, options):
        self.path = path
        self.read_only = options.read_only
        self._file = f = hostfile
        self._cache = options.cache
        self._unsafe = options.cache == "unsafe"
        # a character device takes neither holes nor zero ranges, nor knows where its data is
        self._char_device = f.fd >= 0 and stat.S_ISCHR(os.fstat(f.fd).st_mode)  # fd -1: NBD
        self._unsafe = self._unsafe or self._char_device  # nothing to flush
        self._punch = not self._char_device  # False once the host said it cannot punch holes
        self._zero_range = not self._char_device  # False once the host said it cannot zero ranges
        self._closed = False
        # block devices take discard / zero-range only in whole logical blocks (EINVAL otherwise)
        self._dev_align = max(f.alignment, 512) if f.is_block_device else 1
        self.size = f.size
        self.limits = Limits(
            request_alignment=f.alignment,
            mem_alignment=f.mem_alignment,
            max_transfer=1 << 30,
            discard_alignment=max(f.alignment, 4096),
            write_zeroes_alignment=f.alignment,
        )
        # the hot path: no frame of our own between the block layer and the engine
        self.submit_read = f.submit_read

    # -- class-level ----------------------------------------------------------------------------
    @classmethod
    def probe(cls, head, path):
        return 0  # raw has no magic: the registry falls back to it (with a warning)

    @classmethod
    def create(cls, path, size, options):
        """A regular file becomes ``size`` bytes long (truncated or extended; ``preallocation``
        ``falloc`` reserves its blocks, ``full`` writes zeros). A block or character device is
        written in place and never truncated: it must hold ``size`` bytes (the size the host
        reports for it; a ``ValueError`` naming both sizes otherwise). Raw has no metadata, so
        nothing is written to a device unless ``preallocation=full`` asks for zeros; the bytes it
        held stay until the guest writes them."""
        mode = options.get("preallocation", "off")
        try:
            st = os.stat(path)
        except FileNotFoundError:
            st = None
        if st is not None and (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
            cls._create_on_device(path, size, mode)
            return
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            if mode == "full":
                _write_zeros(fd, size)
            else:
                os.ftruncate(fd, size)
                if mode == "falloc" and size:
                    os.posix_fallocate(fd, 0, size)
            os.fsync(fd)
        except OSError as exc:  # calls on the descriptor: name the file (EFBIG, ENOSPC...)
            if exc.filename is not None:
                raise
            raise OSError(exc.errno, exc.strerror, path) from None
        finally:
            os.close(fd)

    @staticmethod
    def _create_on_device(path, size, mode):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            held = os.lseek(fd, 0, os.SEEK_END)
            if held < size:
                raise ValueError(
                    f"{path}: the device holds {held} bytes, fewer than the image's {size}"
                )
            if mode == "full" and size:
                os.lseek(fd, 0, os.SEEK_SET)
                _write_zeros(fd, size)
                try:
                    os.fsync(fd)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:  # a character device that cannot sync
                        raise
        finally:
            os.close(fd)

    @classmethod
    def open(cls, path, options):
        from vblock.hostio import open_host_file

        if not path:
            raise FileNotFoundError(errno.ENOENT, "raw images need a path", path)
        direct = options.cache == "none"
        engine = options.aio
        f = open_host_file(path, direct=direct, engine=engine, read_only=options.read_only)
        if f.direct and f.size % f.alignment and not f.is_block_device:
            _log.warning(
                "%s: size %d is not a multiple of the O_DIRECT alignment %d; using the page cache",
                path,
                f.size,
                f.alignment,
            )
            f.close()
            f = open_host_file(path, direct=False, engine=engine, read_only=options.read_only)
        return cls(path, f, options)

    # -- I/O ------------------------------------------------------------------------------------
    def submit_write(self, offset, buffers, fua=False):
        fut = self._file.submit_write(offset, buffers)
        if not fua or self._unsafe:
            return fut
        return followed_by(fut, self._file.submit_flush)

    def submit_flush(self):
        if self._unsafe:
            return completed(None)
        return self._file.submit_flush()

    def batch(self):
        return self._file.batch()

    def start_writeback(self):
        self._file.start_writeback()

    def submit_discard(self, offset, length):
        if not self._punch:
            return completed(None)
        a = self._dev_align
        if a > 1:  # discard is advisory: keep the whole blocks inside the range
            end = (offset + length) // a * a
            offset = -(-offset // a) * a
            if end <= offset:
                return completed(None)
            length = end - offset
        return _unless_unsupported(self._file.submit_discard(offset, length), self, "_punch", None)

    def submit_write_zeroes(self, offset, length, may_unmap):
        if offset % self._dev_align or length % self._dev_align:
            return None  # partial device blocks: the block layer writes zero buffers
        if may_unmap and self._punch:
            fut = self._file.submit_zero_range(offset, length, unmap=True)
            # where punching fails, the generic fallback (zero buffers) is still right
            return _note_unsupported(fut, self, "_punch")
        if not self._zero_range:
            return None
        return _note_unsupported(self._file.submit_zero_range(offset, length), self, "_zero_range")

    # -- metadata -------------------------------------------------------------------------------
    def block_status(self, offset, length):
        f = self._file
        end = offset + length
        if f.is_block_device or self._char_device:
            return [Run(offset, length, DATA, offset)]
        runs = []
        pos = offset
        try:
            while pos < end:
                data = f.seek_data(pos)
                if data is None or data >= end:
                    runs.append(Run(pos, end - pos, ZERO))
                    break
                if data > pos:
                    runs.append(Run(pos, data - pos, ZERO))
                hole = min(f.seek_hole(data), end)
                runs.append(Run(data, hole - data, DATA, data))
                pos = hole
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED + (errno.EINVAL,):
                raise
            return [Run(offset, length, DATA, offset)]
        return runs

    def truncate(self, size):
        if self._file.is_block_device:
            raise UnsupportedError(f"{self.path}: a block device cannot be resized")
        self._file.truncate(size)
        self.size = self._file.size

    def info(self):
        f = self._file
        try:
            actual = os.stat(self.path).st_blocks * 512
        except OSError:
            actual = None
        return {
            "actual-size": actual,
            "cache": self._cache,
            "direct": f.direct,
            "engine": f.engine,
            "block-device": f.is_block_device,
            "discard": "punch-hole" if self._punch else "unsupported",
            "write-zeroes": "zero-range" if self._zero_range else "write",
        }

    @property
    def hostfile(self):
        """The ``vblock.hostio.HostFile`` underneath (for tools and tests)."""
        return self._file

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            if not self.read_only and not self._unsafe:
                self._file.flush()
        finally:
            self._file.close()


def _write_zeros(fd, size):
    chunk = bytes(1 << 20)
    pos = 0
    while pos < size:
        pos += os.write(fd, chunk[: min(len(chunk), size - pos)])


def _unless_unsupported(fut: Future, driver, flag: str, result) -> Future:
    """Complete with ``result`` when the host says it cannot; remember that in ``driver.<flag>``."""
    out = Future()

    def done(f):
        exc = f.exception()
        if exc is None:
            out.set_result(result)
        elif isinstance(exc, OSError) and exc.errno in _NOT_SUPPORTED:
            setattr(driver, flag, False)
            out.set_result(result)
        else:
            out.set_exception(exc)

    fut.add_done_callback(done)
    return out


def _note_unsupported(fut: Future, driver, flag: str) -> Future:
    """Pass ``fut`` through; if the host says it cannot, remember that in ``driver.<flag>``."""

    def done(f):
        exc = f.exception()
        if isinstance(exc, OSError) and exc.errno in _NOT_SUPPORTED:
            setattr(driver, flag, False)

    fut.add_done_callback(done)
    return fut

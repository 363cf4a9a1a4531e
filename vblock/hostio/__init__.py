"""Host I/O: aligned, batched reads and writes on host files through the native shim.

``HostFile`` is the public class (see ``vblock.hostio.file``); ``ImageLock`` holds QEMU-compatible
image locks on a file (``vblock.hostio.lock``); ``alloc_buffer`` gives aligned memory.
"""

from ._binding import host_error
from .engine import ENGINES, resolve_engine, uring_available
from .file import HostFile, address_of, alloc_buffer, buffer_address, buffers_aligned
from .hooks import announce, current_io_point, host_file_opener, io_point, open_host_file
from .lock import ImageLock

__all__ = [
    "HostFile",
    "ImageLock",
    "alloc_buffer",
    "address_of",
    "buffer_address",
    "buffers_aligned",
    "ENGINES",
    "resolve_engine",
    "uring_available",
    "open_host_file",
    "host_file_opener",
    "io_point",
    "announce",
    "current_io_point",
    "host_error",
]

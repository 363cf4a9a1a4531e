"""File growth: the reserve past the allocation pointer, how it is made, and the trim that ends it.

QED allocates at the end of its file (``QedState.file_size``, the allocation pointer). The file
itself (``file_length``) grows ahead of that pointer, in steps of half its size (16 MiB to
1 GiB), for two reasons:

* file systems serialise writes that extend a file, while writes inside it run in parallel;
* each step takes the file's lock, so small steps would cost a truncate every few allocations.

Each step is allocated (``HostFile.allocate``: fallocate), not left a hole: a write into a hole
makes the file system allocate on the write's path, which an O_DIRECT write cannot do without
blocking, so io_uring hands it to a worker thread and allocating writes lose much of their
parallelism. Where the file system cannot allocate (EOPNOTSUPP, ENOSYS: asked once, then never
again) or the space is not there (ENOSPC: the writes will tell), the step is a truncate instead.

The reserve is unreferenced: a clean close and the idle need-check clear cut it off (``trim``,
giving its space back), and after a crash the need-check repair at the next open reclaims it as
trailing leaks.

Contract: any thread calls ``extend`` (pool threads, or the calling thread of an inline
allocation) before it writes new clusters; ``trim`` and ``cut`` run with no allocation in flight
(close, the idle clear, repair). All three take ``Growth.lock``, held across the fallocate or
truncate, never together with ``QedState.lock``. The file never shrinks under ``extend``, so
parallel allocations finishing out of order cannot cut each other off.
"""

from __future__ import annotations

import errno
import threading


class Growth:
    """The file's length and its growth reserve for one image (see the module docstring)."""

    def __init__(self, st, length):
        self.st = st
        self.lock = threading.Lock()  # guards file_length and preallocate
        self.file_length = length  # bytes: the host file's length, reserve included
        self.preallocate = True  # the reserve gets disk blocks (until the file system refuses)

    def extend(self, end):
        """Grow the file to at least ``end`` bytes, plus the next step of the reserve; never
        shrinks it."""
        if end <= self.file_length:
            return
        with self.lock:
            length = self.file_length
            if end > length:
                cs = self.st.geo.cluster_size
                step = min(max(length // 2, 16 << 20), 1 << 30)
                end = max(end, -(-(length + step) // cs) * cs)
                f = self.st.f
                allocated = False
                if self.preallocate:
                    try:
                        f.allocate(length, end - length)
                        allocated = True
                    except OSError as exc:  # ENOSPC and the rest: a hole, the writes will tell
                        if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS):
                            self.preallocate = False  # not on this file system: stop asking
                if not allocated:
                    f.truncate(end)
                self.file_length = end

    def trim(self):
        """Cut the file back to the allocation pointer (drop the growth reserve)."""
        with self.lock:
            if self.file_length > self.st.file_size:
                self.st.f.truncate(self.st.file_size)
                self.file_length = self.st.file_size

    def cut(self, size):
        """Make the file exactly ``size`` bytes (repair: trailing leaks go with the reserve)."""
        with self.lock:
            self.st.f.truncate(size)
            self.file_length = size

"""Where a new image goes: the destination of ``create`` and ``convert``, treated as qemu-img does.

``new_image(given)`` is a context manager yielding a ``Destination`` whose ``path`` the verb
creates and writes the image at:

* **A block or character device** is written in place: ``path`` is the device itself. It is never
  replaced, truncated or renamed; the driver's ``create`` checks that the device holds the image
  (see each driver) and writes only what its format needs. ``zero_init`` is False: a device keeps
  what it held, so a copy must write the zeros of its source too.
* **A symlink** is followed: the link stays, the file it points to gets the image, under the rules
  of that file (a device, or a file replaced as below).
* **A regular file, or a name that does not exist yet,** is made under a temporary name in the
  directory of the file it will replace and renamed over it once the body succeeds, so it is never
  left half-written; on any failure (Ctrl-C included) the temporary file is removed and the old
  file is untouched. An existing file's mode and owner carry over to the new one (a change of
  owner the process may not make is an error, before the rename). The file replaced is locked as
  a read-write open locks it until the rename is done, so one that another process uses is
  refused (``ImageLockedError``) and left alone. ``durable`` also syncs the directory, so that
  the rename survives a crash.

Anything else (a directory, a FIFO, a socket) is refused before anything is written.

Errors raised in the body, warnings and log records name the path the user gave, never the
temporary name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import stat
import warnings

from vblock.block import lock_permissions
from vblock.hostio import ImageLock

__all__ = ["Destination", "new_image", "temporary_path"]


@dataclasses.dataclass(frozen=True)
class Destination:
    given: str  # the path the user gave: what messages name
    path: str  # where to create and write the image now
    device: bool  # written in place: a block or character device
    zero_init: bool  # a new image at ``path`` reads as zeros until written


def temporary_path(final: str) -> str:
    """A name in the same directory as ``final`` (so rename is atomic) that nothing else uses."""
    d, base = os.path.split(os.path.abspath(final))
    return os.path.join(d, f".{base}.vblock-{os.getpid()}.tmp")


@contextlib.contextmanager
def new_image(given, durable: bool = True):
    """Yield the ``Destination`` for a new image at ``given``; see the module docstring."""
    given = os.fspath(given)
    target = os.path.realpath(given)  # through every symlink, dangling ones included
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    if st is not None and (stat.S_ISBLK(st.st_mode) or stat.S_ISCHR(st.st_mode)):
        # opened through ``given``: the kernel follows the links, and messages name it
        with _naming(given, given):
            yield Destination(given, given, device=True, zero_init=False)
        return
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), given)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{given}: not a regular file or a device: vblock will not replace it")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise FileNotFoundError(errno.ENOENT, "no such directory", given)
    # The file to be replaced is locked as a read-write open would lock it, from before the new
    # image is made until it has taken the old one's place: a file another process (a VM, qemu-io)
    # is using is refused, as qemu-img refuses it, instead of being swapped out from under it.
    guard = ImageLock(given, *lock_permissions(read_only=False)) if st is not None else None
    tmp = temporary_path(target)
    try:
        with _naming(tmp, given):
            yield Destination(given, tmp, device=False, zero_init=True)
            if st is not None:
                _keep_owner_and_mode(tmp, st, given)
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        if guard is not None:
            guard.close()
    if not durable:
        return
    with contextlib.suppress(OSError):  # make the rename itself durable
        fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _keep_owner_and_mode(tmp: str, old: os.stat_result, given: str) -> None:
    """Give ``tmp`` the owner and permission bits of the file it replaces (owner first: a change
    of owner clears the set-user-ID and set-group-ID bits)."""
    new = os.stat(tmp)
    if (new.st_uid, new.st_gid) != (old.st_uid, old.st_gid):
        try:
            os.chown(tmp, old.st_uid, old.st_gid)
        except PermissionError as exc:
            raise PermissionError(
                exc.errno,
                f"cannot keep its owner {old.st_uid}:{old.st_gid} ({exc.strerror})",
                given,
            ) from None
    os.chmod(tmp, stat.S_IMODE(old.st_mode))


@contextlib.contextmanager
def _naming(used: str, given: str):
    """Within the block, messages that name ``used`` name ``given`` instead: exceptions raised
    (rewritten in place, so their type and traceback stay), warnings and vblock's log records."""
    if used == given:
        yield
        return
    swap = _Swap(used, given)
    handlers = [*logging.getLogger("vblock").handlers, *logging.getLogger().handlers]
    for h in handlers:
        h.addFilter(swap)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                yield
            except BaseException as exc:
                swap.exception(exc)
                raise
    finally:
        for h in handlers:
            h.removeFilter(swap)
    for w in caught:
        warnings.warn_explicit(swap.text(str(w.message)), w.category, w.filename, w.lineno)


class _Swap(logging.Filter):
    def __init__(self, used, given):
        super().__init__()
        self.used = used
        self.given = given

    def text(self, s):
        return s.replace(self.used, self.given) if isinstance(s, str) else s

    def filter(self, record):
        msg = record.getMessage()
        if self.used in msg:
            record.msg, record.args = self.text(msg), None
        return True

    def exception(self, exc):
        if isinstance(exc, OSError):
            if exc.filename == self.used:
                exc.filename = self.given
            if exc.filename2 == self.used:
                exc.filename2 = self.given
        if getattr(exc, "path", None) == self.used:  # ImageError
            with contextlib.suppress(AttributeError):
                exc.path = self.given
        if any(isinstance(a, str) and self.used in a for a in exc.args):
            if isinstance(exc, OSError):
                return  # its args are (errno, strerror): filename is rewritten above
            exc.args = tuple(self.text(a) for a in exc.args)

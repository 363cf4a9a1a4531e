"""``ImageLock``: image locks that vblock and QEMU processes both honour.

The scheme is QEMU's file-posix one (QEMU 2.10 and later), so that a ``vblock serve`` and a
``qemu-io``, ``qemu-img`` or ``qemu-nbd`` on the same image exclude each other:

* Every open of an image has a set of *permissions* it uses and a set it lets others use
  ("shares"). The permission bits, in QEMU's order (its ``BLK_PERM_*``): consistent read (bit 0),
  write (1), write unchanged (2), resize (3). (Older QEMU releases had a fifth bit, graph-mod,
  on bytes 104 and 204; current QEMU has dropped it and has four, and so do we: those two bytes
  are neither taken nor checked here.)
* For each permission ``i`` the open uses, it holds a shared (read) lock on byte ``100 + i`` of
  the file; for each permission it does *not* share, a shared lock on byte ``200 + i``. These are
  byte-range locks on bytes far past anything meaningful, never mandatory: the data is not
  touched, only the lock table. Bytes below 100 are libvirt's.
* An open conflicts with the others when a permission it uses is unshared by one of them (byte
  ``200 + i`` locked by someone else) or when a permission it does not share is used by one of them
  (byte ``100 + i`` locked by someone else). It takes its own bytes first and then looks for
  those conflicts with ``F_OFD_GETLK``, so two opens racing each other cannot both miss the other.

The locks are *open file description* locks (``F_OFD_SETLK``): they belong to one open of the
file, not to the process, so a second open of the same image in the same process conflicts with
the first exactly as another process would, and closing some other descriptor of the file does
not drop them. ``F_OFD_GETLK`` reports ``l_pid = -1`` for such a lock (its owner is an open, not a
process); for a classic POSIX lock it names the process, and the error then says which.

Contract of ``ImageLock``:

* It opens a descriptor of its own on ``path`` (read-only, close-on-exec) and keeps every lock on
  that descriptor only; the image's I/O descriptors are untouched. Symbolic links are followed:
  the target is locked, as with QEMU. Regular files, block and character devices all take locks.
* Locks are taken in the constructor, before the caller reads or writes the image; a conflict
  raises ``vblock.errors.ImageLockedError`` and leaves nothing held. ``change(perm, shared)``
  moves to other permissions (new bytes are taken and checked before unneeded ones are dropped;
  on a conflict the old set stays). ``close()`` drops every lock by closing the descriptor; it is
  idempotent. Methods are not meant to be called from several threads at once.
* ``locking``: ``"on"`` fails (``OSError`` with the host's errno) where the file system has no OFD
  locks; ``"auto"`` carries on without locks there (``active`` is then False); ``"off"`` takes
  none and opens nothing.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from vblock.errors import ImageLockedError

__all__ = [
    "ImageLock",
    "LOCKING_MODES",
    "PERM_ALL",
    "PERM_BASE",
    "PERM_CONSISTENT_READ",
    "PERM_NAMES",
    "PERM_RESIZE",
    "PERM_WRITE",
    "PERM_WRITE_UNCHANGED",
    "SHARED_BASE",
    "perm_names",
]

PERM_CONSISTENT_READ = 1 << 0
PERM_WRITE = 1 << 1
PERM_WRITE_UNCHANGED = 1 << 2
PERM_RESIZE = 1 << 3
PERM_ALL = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE
#: QEMU's names of the permissions, by bit number (they appear in its error messages).
PERM_NAMES = ("consistent read", "write", "write unchanged", "resize")
_BITS = range(len(PERM_NAMES))

PERM_BASE = 100  # byte 100 + i: permission i is used
SHARED_BASE = 200  # byte 200 + i: permission i is not shared

LOCKING_MODES = ("auto", "on", "off")

# struct flock on 64-bit Linux: l_type, l_whence (short), l_start, l_len (off_t), l_pid (pid_t),
# padded to 32 bytes.
_FLOCK = struct.Struct("hhqqi4x")
# What fcntl says when the file system (or the kernel) has no OFD byte-range locks.
_UNSUPPORTED = frozenset(
    {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK, errno.ENOSYS}
)

_fcntl = fcntl.fcntl  # the one host call; a name of its own so tests can stand in for it


def perm_names(perm: int) -> str:
    """``"consistent read, write"`` for a permission mask."""
    return ", ".join(PERM_NAMES[i] for i in _BITS if perm & (1 << i)) or "none"


class _Unsupported(Exception):
    """The file system refused OFD locks (carries the OSError)."""


class ImageLock:
    """The QEMU-compatible locks of one open image. See the module docstring for the contract.

    Args:
        path: the image file or device.
        perm: mask of ``PERM_*`` bits this open uses.
        shared: mask of ``PERM_*`` bits it lets other opens use.
        locking: ``"auto"`` | ``"on"`` | ``"off"``.

    Attributes: ``path``, ``perm``, ``shared``, ``locking``, ``active`` (locks are held).
    """

    def __init__(
        self, path: str | os.PathLike, perm: int, shared: int, locking: str = "auto"
    ) -> None:
        if locking not in LOCKING_MODES:
            raise ValueError(f"locking must be one of {', '.join(LOCKING_MODES)}, not {locking!r}")
        _check_mask(perm, "perm")
        _check_mask(shared, "shared")
        self.path = os.fsdecode(path)
        self.locking = locking
        self.perm = perm
        self.shared = shared
        self._fd = -1
        self._held_perm = 0  # bits whose byte 100+i this descriptor holds
        self._held_unshared = 0  # bits whose byte 200+i this descriptor holds
        if locking == "off":
            return
        try:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except ValueError:  # a NUL inside the name: no host path at all
            raise OSError(errno.EINVAL, "the name holds a NUL byte", self.path) from None
        try:
            self._apply(perm, PERM_ALL & ~shared, drop=False)
            self._check(perm, shared)
        except _Unsupported as exc:
            self.close()
            if locking == "on":
                raise exc.args[0] from None
        except BaseException:
            self.close()
            raise

    # -- state ------------------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        """True while this object holds locks (False after ``close``, with ``locking="off"``, or
        under ``"auto"`` on a file system without OFD locks)."""
        return self._fd >= 0

    def __repr__(self):
        state = "held" if self.active else "none"
        return (
            f"<ImageLock {self.path!r} perm=[{perm_names(self.perm)}] "
            f"unshared=[{perm_names(PERM_ALL & ~self.shared)}] {state}>"
        )

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- operations -------------------------------------------------------------------------------
    def change(self, perm: int, shared: int) -> None:
        """Move to ``perm`` / ``shared``: take and check the new bytes, then drop what is no longer
        needed. On a conflict (``ImageLockedError``) the previous permissions stay in force."""
        _check_mask(perm, "perm")
        _check_mask(shared, "shared")
        if self.active:
            old_perm, old_unshared = self._held_perm, self._held_unshared
            try:
                self._apply(old_perm | perm, old_unshared | (PERM_ALL & ~shared), drop=False)
                self._check(perm, shared)
            except _Unsupported as exc:  # cannot happen once locks were taken; keep the errno
                raise exc.args[0] from None
            except BaseException:
                self._apply(old_perm, old_unshared, drop=True)
                raise
            self._apply(perm, PERM_ALL & ~shared, drop=True)
        self.perm, self.shared = perm, shared

    def close(self) -> None:
        """Drop every lock (closing the descriptor does it). Idempotent."""
        fd, self._fd = self._fd, -1
        self._held_perm = self._held_unshared = 0
        if fd >= 0:
            os.close(fd)

    # -- mechanics --------------------------------------------------------------------------------
    def _apply(self, perm: int, unshared: int, drop: bool) -> None:
        """Hold byte 100+i for each bit of ``perm`` and 200+i for each bit of ``unshared``; with
        ``drop``, release the held bytes outside those masks."""
        for base, want, attr in (
            (PERM_BASE, perm, "_held_perm"),
            (SHARED_BASE, unshared, "_held_unshared"),
        ):
            held = getattr(self, attr)
            for i in _BITS:
                bit = 1 << i
                if want & bit and not held & bit:
                    self._setlk(base + i, fcntl.F_RDLCK)
                    held |= bit
                elif drop and held & bit and not want & bit:
                    self._setlk(base + i, fcntl.F_UNLCK)
                    held &= ~bit
                setattr(self, attr, held)

    def _check(self, perm: int, shared: int) -> None:
        """Raise ``ImageLockedError`` if another open does not share a bit of ``perm`` or uses a
        bit outside ``shared`` (QEMU's order: used permissions first, then unshared ones)."""
        for i in _BITS:
            if perm & (1 << i):
                self._test(SHARED_BASE + i, f'"{PERM_NAMES[i]}" lock')
        for i in _BITS:
            if not shared & (1 << i):
                self._test(PERM_BASE + i, f'shared "{PERM_NAMES[i]}" lock')

    def _setlk(self, byte: int, kind: int) -> None:
        try:
            _fcntl(self._fd, fcntl.F_OFD_SETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                # Somebody holds an exclusive lock on a byte that QEMU only ever read-locks.
                pid = self._holder(byte, fcntl.F_RDLCK)
                raise ImageLockedError(
                    self.path,
                    f"failed to lock byte {byte}: {_who(pid)}",
                    lock=f"byte {byte}",
                    pid=pid,
                ) from None
            raise self._os_error(exc, f"lock byte {byte} of") from None

    def _test(self, byte: int, what: str) -> None:
        pid = self._holder(byte, fcntl.F_WRLCK)
        if pid is not None:
            raise ImageLockedError(
                self.path, f"failed to get {what}: {_who(pid)}", lock=what[: -len(" lock")], pid=pid
            )

    def _holder(self, byte: int, kind: int):
        """None if no other open holds a lock on ``byte`` that conflicts with ``kind``; else the
        holder's pid (-1 for an OFD lock, whose owner is an open rather than a process)."""
        try:
            got = _fcntl(self._fd, fcntl.F_OFD_GETLK, _FLOCK.pack(kind, os.SEEK_SET, byte, 1, 0))
        except OSError as exc:
            raise self._os_error(exc, f"test byte {byte} of") from None
        l_type, _whence, _start, _len, pid = _FLOCK.unpack(got)
        if l_type == fcntl.F_UNLCK:
            return None
        return pid

    def _os_error(self, exc: OSError, op: str) -> BaseException:
        err = OSError(exc.errno, f"{os.strerror(exc.errno)} ({op} {self.path} for image locking)")
        err.filename = self.path
        if exc.errno in _UNSUPPORTED:
            if self._held_perm or self._held_unshared:  # it worked a moment ago: a real failure
                return err
            err.strerror += ": the file system has no OFD locks (locking='auto' or 'off' goes on)"
            return _Unsupported(err)
        return err


def _who(pid) -> str:
    if pid is not None and pid > 0:
        return f"process {pid} holds a conflicting lock on the image"
    return "another process (or another open in this one) is using the image"


def _check_mask(mask, name: str) -> None:
    if type(mask) is not int or mask & ~PERM_ALL or mask < 0:
        raise ValueError(f"{name} must be a mask of PERM_* bits, not {mask!r}")

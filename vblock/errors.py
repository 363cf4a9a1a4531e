"""Exception classes, one per meaning.

``VblockError`` is the base of everything vblock raises on purpose and is never raised itself.
Host failures are *not* wrapped: they stay ``OSError`` with their errno, and the message names the
operation, the path and the offset (see ``vblock.hostio``).
"""

from __future__ import annotations


class VblockError(Exception):
    """Base class; never raised itself."""


class ImageError(VblockError):
    """An image file is corrupt or not what it claims to be.

    ``path`` is the image file, ``field`` the header field or structure at fault (``"cluster_size"``,
    ``"l1_table_offset"``, ``"backing_file"``...), or ``None`` when no single field is to blame.
    Nothing is written to an image that failed to open.
    """

    def __init__(self, path, field, message):
        self.path = str(path) if path is not None else None
        self.field = field
        self.message = message
        where = self.path if field is None else f"{self.path}: {field}"
        super().__init__(f"{where}: {message}" if self.path else message)


class BackingFileError(ImageError, OSError):
    """An image's backing file cannot be opened: missing, unreadable, a directory...

    An ``ImageError`` (``field`` is ``"backing_file"``) that is also the host's ``OSError``, with
    its ``errno``. ``path`` is the image that names the backing file, ``backing`` the name as the
    image stores it, ``reason`` the host's words (``"No such file or directory"``). As an OSError
    its ``filename`` is ``path`` and its ``strerror`` ``"cannot open backing file NAME: REASON"``,
    so the CLI's one line names both files.
    """

    def __init__(self, path, backing, errno, reason):
        text = f"cannot open backing file {backing}: {reason}"
        OSError.__init__(self, errno, text, str(path))
        self.path = str(path)
        self.field = "backing_file"
        self.message = text
        self.backing = backing
        self.reason = reason

    def __str__(self):
        return f"{self.path}: {self.message}"


class ImageLockedError(VblockError):
    """Another open of the image (another process, or another open in this one) holds a lock
    that this open's permissions conflict with; QEMU processes take the same locks.

    ``path`` is the image, ``lock`` what could not be had (``'"write"'`` when another open does not
    share write, ``'shared "write"'`` when another open writes and this one does not share that),
    ``pid`` the holder when a classic POSIX lock names it, else None (or -1: an open, not a
    process, owns the lock). Nothing was read from or written to the image.
    """

    def __init__(self, path, message, lock=None, pid=None):
        self.path = str(path) if path is not None else None
        self.lock = lock
        self.pid = pid
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class UnknownFormatError(VblockError, ValueError):
    """A format that no registered driver serves: a name given by the caller, or the format a
    file's header shows (``vblock.block.probe`` knows formats vblock has no driver for).
    ``format`` is that format's name, when there is one."""

    def __init__(self, message, format=None):
        super().__init__(message)
        self.format = format


class UnknownOptionError(VblockError, ValueError):
    """An option name or value that the driver or the open call does not know; names the option."""

    def __init__(self, option, message=None):
        self.option = option
        super().__init__(message or f"unknown option {option!r}")


class ReadOnlyError(VblockError, PermissionError):
    """A write, discard, resize or repair on an image opened read-only."""


class UnsupportedError(VblockError, NotImplementedError):
    """The driver does not implement the operation (for example shrinking a QED image)."""


class GuestError(VblockError):
    """A guest broke the virtio rules. ``status`` is the virtio status byte to answer with
    (``VIRTIO_BLK_S_IOERR`` or ``VIRTIO_BLK_S_UNSUPP``), or ``None`` when the device must instead
    set DEVICE_NEEDS_RESET."""

    def __init__(self, message, status=None):
        self.status = status
        super().__init__(message)


class QemuCompatibilityWarning(UserWarning):
    """vblock made or opened something QEMU's own driver cannot use, or uses badly (a QED image
    with table_size 1, which QEMU refuses to open, or >= 8, which QEMU corrupts on large writes).
    vblock itself serves such images correctly; the warning is for images meant for QEMU too."""

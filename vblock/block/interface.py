"""The operation table every block driver implements, and what the block layer promises it.

A driver is a class registered under a format name. Its classmethods probe, create and open images;
an open image is one driver instance (the state object) whose methods are the operations below.
Devices and users never call a driver directly: they go through ``vblock.block.Image``, which checks
every request once, at the edge, and then relies on the guarantees written here.

Guarantees the block layer gives every driver operation (``vblock.block.image`` enforces them):

* Offsets and lengths are in bytes, non-negative, and ``offset + length <= self.size``.
* ``submit_read`` / ``submit_write``: ``offset`` and every buffer's length are multiples of
  ``self.limits.request_alignment``; every buffer's address is a multiple of
  ``self.limits.mem_alignment``; the total length is at most ``self.limits.max_transfer``.
  Buffers are ``memoryview`` objects of format ``'B'`` (writable for reads). The caller owns them
  and keeps them alive and untouched until the returned future completes; they may point straight
  into guest memory, so a driver never keeps a reference after completion.
* Write-type operations (write, write_zeroes, discard, truncate, repair) never reach a driver
  opened read-only: the edge refuses them with ``ReadOnlyError``.
* Any thread may call any operation, concurrently. Overlapping in-flight requests carry no ordering
  promise between them (as in QEMU); the driver only guarantees that each sector ends up holding
  the whole content of one of the writes to it.

What a driver returns:

* ``submit_*`` return a ``vblock.future.Future``; its result is the number of bytes moved for reads
  and writes (a read never returns short within ``size``), ``None`` for the others. Futures may
  complete on any thread (engine completion threads, driver pool threads); callbacks must not block.
* Failures complete the future with an exception: ``OSError`` with errno for host failures,
  ``ImageError`` for corruption found while serving the request.
* ``block_status`` describes this layer only: runs of ``DATA`` (with ``host_offset``), ``ZERO`` and
  ``UNALLOCATED`` (the backing file decides; ``Image.block_status`` resolves the chain).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

from vblock.future import Future

DATA = "data"
ZERO = "zero"
UNALLOCATED = "unallocated"

CACHE_MODES = ("none", "writeback", "unsafe")
AIO_MODES = ("auto", "io_uring", "threads")
DISCARD_MODES = ("unmap", "ignore")


class Run(NamedTuple):
    """A run of guest bytes with one allocation state.

    ``offset``/``length`` in bytes of the guest (virtual) disk; ``kind`` one of DATA, ZERO,
    UNALLOCATED; ``host_offset`` the byte offset in the image file for DATA runs (None where the
    data has no place of its own, as a compressed qcow2 cluster), and for ZERO or UNALLOCATED runs
    whose host clusters stay reserved (qcow2's preallocated zero clusters), else None;
    ``depth`` 0 for this image, 1 for its backing file, and so on (set by ``Image.block_status``).
    """

    offset: int
    length: int
    kind: str
    host_offset: int | None = None
    depth: int = 0


@dataclass(frozen=True)
class Limits:
    """Alignment and size limits a driver declares once, at open; the block layer pads and splits."""

    request_alignment: int = 1  # bytes: offsets and buffer lengths reaching the driver
    mem_alignment: int = 1  # bytes: buffer addresses reaching the driver
    max_transfer: int = 1 << 30  # bytes in one read or write
    discard_alignment: int = 1  # bytes: discard granularity (informational, for devices)
    write_zeroes_alignment: int = 1  # bytes (informational, for devices)


@dataclass(frozen=True)
class OpenOptions:
    """How an image is opened. ``driver_options`` holds format-specific options, already checked
    against the driver's ``open_options`` (unknown names raise ``UnknownOptionError``).

    Backing files: a driver never opens one itself; it calls ``open_backing``. ``no_backing``
    (QEMU's BDRV_O_NO_BACKING) opens the image alone, for work on its own metadata (info, check,
    map of this layer, changing the backing name): ``open_backing`` then returns None, the image
    keeps its backing file's name, and ``Image`` refuses data writes (they would copy zeros where
    the backing file has data). ``backing_opener`` replaces the block layer's opener
    (``vblock.block.backing.open_backing``, same signature), for embedders and tests."""

    read_only: bool = False
    cache: str = "none"  # "none" = O_DIRECT, "writeback" = page cache, "unsafe" = flush is a no-op
    aio: str = "auto"  # host engine: "auto" | "io_uring" | "threads"
    discard: str = "unmap"  # "unmap" passes discards down, "ignore" drops them
    driver_options: dict = field(default_factory=dict)
    no_backing: bool = False
    backing_opener: Callable | None = None  # (parent path, name, fmt or None, options) -> Image
    # Image locks (see vblock.block's docstring); the backing opener passes both on to the
    # backing file's open.
    force_share: bool = False  # read-only opens only: share everything, as ``qemu-img -U``
    locking: str = "auto"  # "auto" | "on" | "off"

    @property
    def direct(self) -> bool:
        return self.cache == "none"

    def open_backing(self, parent: str, name: str, fmt: str | None = None) -> Any:
        """The backing ``Image`` named ``name`` by the image at ``parent`` (``fmt`` as recorded
        there, None to probe), opened read-only; None when opened with ``no_backing``. Raises
        ``ImageError`` (a loop in the chain, a corrupt backing file), ``BackingFileError`` (an
        ``OSError`` too) when the host cannot open it, ``UnknownFormatError``."""
        if self.no_backing:
            return None
        opener = self.backing_opener
        if opener is None:
            from vblock.block.backing import open_backing as opener
        return opener(parent, name, fmt, self)


class BlockDriver:
    """Base class of every driver: the operation table. Subclasses override what they support;
    the defaults raise ``UnsupportedError`` or fall back generically as documented per method."""

    format_name: ClassVar[str] = ""
    #: option name -> converter (callable taking the given value) for ``create_image`` options
    create_options: ClassVar[dict] = {}
    #: option name -> one line on what it means and takes (the tools' ``-o help`` prints it)
    create_option_help: ClassVar[dict] = {}
    #: False for formats whose images live in no host file (null, memory): the tools do not create
    #: them, and ``open_image`` takes no image locks for them
    file_backed: ClassVar[bool] = True
    #: option name -> converter for format-specific ``open_image`` options
    open_options: ClassVar[dict] = {}

    # Instance attributes every open driver sets:
    path: str
    size: int  # virtual size in bytes
    read_only: bool
    limits: Limits

    # -- class-level operations -----------------------------------------------------------------
    @classmethod
    def probe(cls, head: bytes, path: str) -> int:
        """Score 0..100 that the file starting with ``head`` (up to 4 KiB) is this format."""
        return 0

    @classmethod
    def create(cls, path: str, size: int, options: dict) -> None:
        """Create (or overwrite) ``path`` as an empty image of ``size`` bytes."""
        from vblock.errors import UnsupportedError

        raise UnsupportedError(f"{cls.format_name}: create is not supported")

    @classmethod
    def open(cls, path: str, options: OpenOptions) -> BlockDriver:
        raise NotImplementedError

    # -- I/O ------------------------------------------------------------------------------------
    def submit_read(self, offset: int, buffers: Sequence[memoryview]) -> Future:
        raise NotImplementedError

    def submit_write(self, offset: int, buffers: Sequence[memoryview], fua: bool = False) -> Future:
        raise NotImplementedError

    def submit_flush(self) -> Future:
        raise NotImplementedError

    def submit_discard(self, offset: int, length: int) -> Future:
        """Default: discard is advisory, so doing nothing is correct."""
        from vblock.future import completed

        return completed(None)

    def submit_write_zeroes(self, offset: int, length: int, may_unmap: bool) -> Future:
        """Default: the block layer writes zero buffers instead (return ``None`` to ask for it).

        A future that fails with ``OSError(EOPNOTSUPP)`` asks for the same fallback (for hosts that
        only tell on the first try). The range need not be aligned to ``limits``: a driver with
        alignment needs of its own returns ``None`` for ranges it cannot serve."""
        return None

    def batch(self) -> Any:
        """A context manager: the requests this thread submits inside it may reach the host
        together, in one system call, when it exits (``HostFile.batch``). A caller inside must
        not wait for any of them. Default: no batching (requests go out one by one)."""
        return contextlib.nullcontext(self)

    def start_writeback(self) -> None:
        """Start writing what the host's page cache holds of this image to the device, without
        waiting (a bulk writer calls it every so often, so that its final flush finds little left
        to write). Default: nothing is cached, nothing to do."""

    # -- metadata ---------------------------------------------------------------------------------
    def block_status(self, offset: int, length: int) -> list:
        """Runs covering [offset, offset+length) for this layer. Default: all DATA."""
        return [Run(offset, length, DATA, offset)]

    def truncate(self, size: int) -> None:
        from vblock.errors import UnsupportedError

        raise UnsupportedError(f"{self.format_name}: resize is not supported")

    def check(self, repair: bool = False) -> dict:
        """qemu-img check's JSON fields (``check-errors``, ``corruptions``, ``leaks``, ...)."""
        return {"check-errors": 0, "corruptions": 0, "leaks": 0}

    def info(self) -> dict:
        return {}

    @property
    def backing(self) -> Any:
        """The open backing ``Image`` or None."""
        return None

    def change_backing(self, name: str | None, fmt: str | None) -> None:
        from vblock.errors import UnsupportedError

        raise UnsupportedError(f"{self.format_name}: has no backing file")

    def close(self) -> None:
        """Finish in-flight requests, flush, release everything. Idempotent."""

"""Driver registry: format names -> driver classes, and format probing.

Where drivers come from
-----------------------
* **Built-in drivers** are the sub-packages of ``vblock.drivers`` (the ``drivers/`` folder of the
  source tree). Convention: ``drivers/<name>/__init__.py`` exposes ``DRIVER = TheDriverClass``,
  a ``vblock.block.interface.BlockDriver`` subclass whose ``format_name`` is ``<name>``. Nothing
  else is needed: adding the folder adds the format. A package without ``DRIVER`` is skipped; one
  that fails to import is skipped with a logged warning (so one broken driver never hides the
  others).
* **Third-party drivers** are installed distributions that declare an entry point in the group
  ``vblock.drivers`` whose name is the format name and whose value is the driver class::

      [project.entry-points."vblock.drivers"]
      mydisk = "mypkg.driver:MyDiskDriver"

  The distributions are scanned only when a name is not a built-in one, or when every format is
  wanted (``available()``, probing), and a driver is loaded when first used. A built-in name wins
  over an entry point of the same name (with a warning when the scan meets it).
* ``register(name, cls)`` adds a driver at run time (embedders, tests); ``unregister(name)``
  takes it away again.

Probing
-------
``probe_format(path)`` reads the first 4 KiB of the file and asks every driver's ``probe``
classmethod for a score (0..100); the highest positive score wins. When no driver recognises the
file, the magics of ``vblock.block.probe`` name the formats vblock has no driver for (qcow2, vmdk,
vhdx, luks...): such a file raises ``UnknownFormatError`` naming its format, and never opens as
raw. A file that shows no known magic at all is opened as raw and a warning is logged: a guest can write any header into a raw disk
(QEMU's CVE-2008-2004), so raw disks should always be opened with ``format="raw"``, which never
probes and therefore never reinterprets what the guest wrote.

Discovery runs once per process (under a lock) and is cached; ``refresh()`` forgets the cache
(after installing a distribution, in tests). Opening a built-in format never reads the installed
distributions' metadata. Probing does, since a plug-in may claim a file no built-in knows; it reads
the ``entry_points.txt`` files on ``sys.path`` itself, as ``importlib.metadata`` would, because
importing that is a noticeable part of a short command's start-up (it takes over where the path
holds a zip archive or a finder with distributions of its own).
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil
import threading

from vblock.block import probe
from vblock.errors import UnknownFormatError

__all__ = [
    "ENTRY_POINT_GROUP",
    "PROBE_BYTES",
    "available",
    "get_driver",
    "probe_format",
    "refresh",
    "register",
    "unregister",
]

_log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vblock.drivers"
PROBE_BYTES = 4096

_lock = threading.RLock()
_table: dict | None = None  # name -> driver class, or an EntryPoint not loaded yet
_scanned = False  # the entry points are in _table
_added: dict = {}  # names given to register(), kept across refresh()


def _builtins() -> dict:
    found = {}
    try:
        import vblock.drivers as pkg
    except ImportError as exc:  # not installed: only entry points and register() work
        _log.warning("vblock.drivers is not importable (%s); built-in drivers unavailable", exc)
        return found
    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.ispkg:
            continue
        try:
            module = importlib.import_module(f"{pkg.__name__}.{mod.name}")
        except Exception as exc:
            _log.warning("built-in driver %r failed to import: %s", mod.name, exc)
            continue
        cls = getattr(module, "DRIVER", None)
        if cls is None:
            continue
        found[getattr(cls, "format_name", None) or mod.name] = cls
    return found


def _scan_entry_points(table) -> None:
    """Add the entry points of the group to ``table``, never over a name it already has."""
    try:
        eps = _path_entry_points()
        if (
            eps is None
        ):  # something on the path that only importlib.metadata reads, or reads its own way
            from importlib import metadata

            eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a broken distribution on sys.path
        _log.warning("could not read %s entry points: %s", ENTRY_POINT_GROUP, exc)
        eps = ()
    for ep in eps:
        if ep.name in table:
            if not _is_entry_point(table[ep.name]):
                _log.warning(
                    "entry point %s = %s ignored: %r is a built-in driver",
                    ep.name,
                    ep.value,
                    ep.name,
                )
            continue
        table[ep.name] = ep


class _EntryPoint:
    """An entry point read by :func:`_path_entry_points`: ``name``, ``value`` (``module:attr``)
    and ``load()``, as ``importlib.metadata.EntryPoint`` has them."""

    __slots__ = ("name", "value")

    def __init__(self, name, value):
        self.name = name
        self.value = value

    def load(self):
        module, _, attrs = self.value.split("[", 1)[0].partition(
            ":"
        )  # extras play no part in loading
        obj = importlib.import_module(module.strip())
        attrs = attrs.strip()
        for attr in attrs.split(".") if attrs else ():
            obj = getattr(obj, attr)
        return obj


def _path_entry_points():
    """The group's entry points from the ``*.dist-info`` / ``*.egg-info`` directories on
    ``sys.path``, found the way ``importlib.metadata`` finds them (path order; of several
    distributions with one normalised name the first wins; sections and comments as it parses
    them), but without importing it (a noticeable part of a short command's start-up). None
    when the path holds something that only it reads (a zip archive, an ``.egg`` directory, a
    meta path finder with distributions of its own) or that it would refuse (an undecodable file,
    a line that is not ``name = value``): then it reads the path itself, with its own errors."""
    import re
    import sys
    from importlib.machinery import PathFinder

    if any(hasattr(f, "find_distributions") and f is not PathFinder for f in sys.meta_path):
        return None
    seen = set()
    found = []
    for entry in sys.path:
        base = entry or "."
        if os.path.isfile(base) or base.lower().endswith(".egg"):
            return None  # a zip archive, or an egg with its EGG-INFO inside
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in names:
            stem, dot, kind = name.lower().rpartition(".")
            if not dot or kind not in ("dist-info", "egg-info"):
                continue
            dist = re.sub(
                r"[-_.]+", "_", stem.split("-", 1)[0]
            )  # normalised, as importlib.metadata does
            if dist in seen:
                continue
            seen.add(dist)
            try:
                with open(os.path.join(base, name, "entry_points.txt"), encoding="utf-8") as f:
                    text = f.read()
            except OSError:  # none, or an .egg-info file rather than a directory
                continue
            except ValueError:  # not UTF-8
                return None
            entries = _group_entries(text, ENTRY_POINT_GROUP)
            if entries is None:
                return None
            found.extend(_EntryPoint(n, v) for n, v in entries)
    return found


def _group_entries(text, group):
    """``[(name, value)]`` of section ``[group]`` in an ``entry_points.txt``, read as
    ``importlib.metadata`` reads it; None if some section holds a line that is not ``name =
    value`` (which it refuses)."""
    section = None
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line[0] == "#":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line.strip("[]")
        elif section is not None:
            if "=" not in line:
                return None
            if section == group:
                name, _, value = line.partition("=")
                out.append((name.strip(), value.strip()))
    return out


def _is_entry_point(entry) -> bool:
    return not isinstance(entry, type) and hasattr(entry, "load")


def _get_table(everything=False) -> dict:
    """The table of built-ins and registered drivers; with ``everything``, entry points too."""
    global _table, _scanned
    table = _table
    if table is None or (everything and not _scanned):
        with _lock:
            if _table is None:
                _table = {**_builtins(), **_added}
                _scanned = False
            if everything and not _scanned:
                _scan_entry_points(_table)
                _scanned = True
            table = _table
    return table


def refresh() -> None:
    """Forget what discovery found; the next lookup scans built-ins and entry points again."""
    global _table, _scanned
    with _lock:
        _table = None
        _scanned = False


def register(name: str, cls) -> None:
    """Register ``cls`` under ``name`` (replacing any driver of that name) for this process."""
    with _lock:
        _added[name] = cls
        if _table is not None:
            _table[name] = cls


def unregister(name: str) -> None:
    """Forget a driver given to ``register`` (built-ins and entry points come back on ``refresh``)."""
    with _lock:
        _added.pop(name, None)
    refresh()


def available() -> list:
    """Sorted names of every registered format (built-in, entry point, ``register``)."""
    return sorted(_get_table(everything=True))


def get_driver(name: str):
    """The driver class for format ``name``; ``UnknownFormatError`` names it when there is none."""
    if not isinstance(name, str):
        raise UnknownFormatError(f"unknown format {name!r}", format=name)
    table = _get_table()
    entry = table.get(name)
    if entry is None:
        table = _get_table(everything=True)  # not built in: maybe a plugin's
        entry = table.get(name)
    if entry is None:
        known = ", ".join(sorted(table)) or "none"
        raise UnknownFormatError(f"unknown format {name!r} (available: {known})", format=name)
    if _is_entry_point(entry):
        try:
            cls = entry.load()
        except Exception as exc:
            raise UnknownFormatError(
                f"format {name!r}: entry point {entry.value} failed to load: {exc}", format=name
            ) from exc
        with _lock:
            if _table is table:
                table[name] = cls
        entry = cls
    return entry


def _file_formats() -> list:
    """Formats whose driver reads image files: raw first, then those that recognise a header."""
    from vblock.block.interface import BlockDriver

    names = ["raw"] if "raw" in _get_table(everything=True) else []
    for name in available():
        try:
            cls = get_driver(name)
        except UnknownFormatError:
            continue
        probe_fn = getattr(getattr(cls, "probe", None), "__func__", None)
        if name != "raw" and probe_fn is not BlockDriver.probe.__func__:
            names.append(name)
    return names


def unsupported(path, name) -> UnknownFormatError:
    """The error for a file whose header shows format ``name``, which no driver serves."""
    return UnknownFormatError(
        f"{path}: image format {name!r} is not supported (vblock reads {', '.join(_file_formats())}); "
        f"convert it with qemu-img convert -O qed",
        format=name,
    )


def _read_ends(path):
    """The first ``PROBE_BYTES`` bytes of the file and its last ``probe.TAIL_BYTES`` (empty when
    the file is no longer than its head: the tail is then within the head)."""
    with open(path, "rb") as f:
        head = f.read(PROBE_BYTES)
        tail = b""
        if len(head) >= probe.TAIL_BYTES:
            try:
                end = f.seek(0, os.SEEK_END)
                if end >= probe.TAIL_BYTES:
                    f.seek(end - probe.TAIL_BYTES)
                    tail = f.read(probe.TAIL_BYTES)
            except OSError:  # not seekable (a character device, a pipe): no end to look at
                tail = b""
    return head, tail


def probe_format(path) -> str:
    """The format of the file at ``path``, by magic; ``"raw"`` (with a warning) when none matches.

    A driver that recognises the file wins. Otherwise the file is matched against the magics of
    every format ``vblock.block.probe`` knows: one with no driver here raises
    ``UnknownFormatError`` naming it (its ``format`` attribute), never falls back to raw."""
    head, tail = _read_ends(path)
    best, best_score = None, 0
    for name in available():
        try:
            cls = get_driver(name)
            score = int(cls.probe(head, str(path)))
        except Exception as exc:
            _log.debug("probe by %r failed: %s", name, exc)
            continue
        if score > best_score:
            best, best_score = name, score
    if best is not None and best != "raw":
        return best
    known = probe.identify(head, tail)
    if known is not None:
        if known in _get_table(everything=True):  # a driver that did not claim the file itself
            return known
        raise unsupported(path, known)
    _log.warning(
        "%s: no format given and no known header found; opening as raw. A guest can write any "
        "header into a raw disk: pass format='raw' to open raw disks safely",
        path,
    )
    return "raw"

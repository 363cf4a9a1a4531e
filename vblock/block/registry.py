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
file it is opened as raw and a warning is logged: a guest can write any header into a raw disk
(QEMU's CVE-2008-2004), so raw disks should always be opened with ``format="raw"``, which never
probes and therefore never reinterprets what the guest wrote.

Discovery runs once per process (under a lock) and is cached; ``refresh()`` forgets the cache
(after installing a distribution, in tests). Opening a built-in format never reads the installed
distributions' metadata (importing ``importlib.metadata`` and scanning them costs a command
about 30 ms).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
import threading

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
    from importlib import metadata

    try:
        eps = metadata.entry_points(group=ENTRY_POINT_GROUP)
    except Exception as exc:  # a broken distribution on sys.path
        _log.warning("could not read %s entry points: %s", ENTRY_POINT_GROUP, exc)
        eps = ()
    for ep in eps:
        if ep.name in table:
            if not _is_entry_point(table[ep.name]):
                _log.warning("entry point %s = %s ignored: %r is a built-in driver", ep.name, ep.value, ep.name)
            continue
        table[ep.name] = ep


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
        raise UnknownFormatError(f"unknown format {name!r}")
    table = _get_table()
    entry = table.get(name)
    if entry is None:
        table = _get_table(everything=True)  # not built in: maybe a plugin's
        entry = table.get(name)
    if entry is None:
        known = ", ".join(sorted(table)) or "none"
        raise UnknownFormatError(f"unknown format {name!r} (available: {known})")
    if _is_entry_point(entry):
        try:
            cls = entry.load()
        except Exception as exc:
            raise UnknownFormatError(f"format {name!r}: entry point {entry.value} failed to load: {exc}") from exc
        with _lock:
            if _table is table:
                table[name] = cls
        entry = cls
    return entry


def probe_format(path) -> str:
    """The format of the file at ``path``, by magic; ``"raw"`` (with a warning) when none matches."""
    with open(path, "rb") as f:
        head = f.read(PROBE_BYTES)
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
    if best is None or best == "raw":
        _log.warning(
            "%s: no format given and no known header found; opening as raw. A guest can write any "
            "header into a raw disk: pass format='raw' to open raw disks safely",
            path,
        )
        return "raw"
    return best

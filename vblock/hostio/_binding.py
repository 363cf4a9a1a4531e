"""The one gatekeeper of the compiled shim: only this module imports ``vblock._vbio``.

It checks at import that the shim was built from the same sources as this package (a stale build
fails here, not mysteriously later) and turns the shim's ``-errno`` results into ``OSError`` with the
operation, the path and the offset in the message.
"""

from __future__ import annotations

import errno as _errno
import os

from vblock._vbio import ffi, lib

#: The shim version this package expects (native/vbio.h VBIO_VERSION).
EXPECTED_VERSION = "14"

_built = ffi.string(lib.vbio_version()).decode()
if _built != EXPECTED_VERSION:  # pragma: no cover - only with a stale build
    raise ImportError(
        f"vblock._vbio was built from shim version {_built}, this package needs {EXPECTED_VERSION}: "
        "reinstall vblock (pip install -e .)"
    )

__all__ = ["ffi", "lib", "host_error", "check"]


def host_error(
    err: int, op: str, path: str, offset: int | None = None, length: int | None = None
) -> OSError:
    """The ``OSError`` for a failed host operation; ``err`` is a positive errno."""
    where = f" at offset {offset}" if offset is not None else ""
    if length is not None:
        where += f" length {length}"
    exc = OSError(err, f"{os.strerror(err)} ({op} {path}{where})")
    exc.filename = path
    return exc


def check(ret, op, path, offset=None, length=None):
    """Return ``ret`` if it is not a negative errno, else raise the matching ``OSError``."""
    if ret < 0:
        raise host_error(-ret, op, path, offset, length)
    return ret


EBADF = _errno.EBADF
EOPNOTSUPP = _errno.EOPNOTSUPP
EINVAL = _errno.EINVAL
ENXIO = _errno.ENXIO

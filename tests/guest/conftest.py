"""Guest tests: skip (with the reason) where QEMU or the Debian kernel/busybox cannot be had."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from tests.guest import harness

_reason = None


def pytest_collection_modifyitems(config, items):
    global _reason
    mine = [it for it in items if "tests/guest/" in str(it.fspath).replace(os.sep, "/")]
    if not mine:
        return
    _reason = harness.missing()
    if _reason:
        skip = pytest.mark.skip(reason=f"guest tests: {_reason}")
        for it in mine:
            it.add_marker(skip)


@pytest.fixture
def gdir():
    """A scratch directory on a disk (O_DIRECT works there) for images, the socket and logs."""
    base = "/var/tmp" if os.path.isdir("/var/tmp") else None
    d = tempfile.mkdtemp(prefix="vblock-guest-", dir=base)
    yield d
    shutil.rmtree(d, ignore_errors=True)

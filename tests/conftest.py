"""Shared fixtures: a scratch directory on a file system that supports O_DIRECT."""

import os
import pathlib
import shutil
import tempfile

import pytest


def _direct_capable_dir():
    # /tmp may be tmpfs (no O_DIRECT); prefer a disk-backed place. VBLOCK_TEST_DIR overrides.
    for cand in (os.environ.get("VBLOCK_TEST_DIR"), "/var/tmp", tempfile.gettempdir()):
        if cand and os.path.isdir(cand) and os.access(cand, os.W_OK):
            return cand
    return None


@pytest.fixture
def scratch(tmp_path_factory):
    """A fresh directory where O_DIRECT works (falls back to pytest's tmp_path)."""
    base = _direct_capable_dir()
    if base is None:
        yield tmp_path_factory.mktemp("scratch")
        return
    d = tempfile.mkdtemp(prefix="vblock-test-", dir=base)
    yield pathlib.Path(d)
    shutil.rmtree(d, ignore_errors=True)

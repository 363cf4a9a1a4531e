"""``vblock.hostio.lock.ImageLock`` on its own: bytes, checks, change and close."""

from __future__ import annotations

import fcntl
import os
import struct

import pytest

from vblock.errors import ImageLockedError
from vblock.hostio.lock import (
    PERM_ALL,
    PERM_CONSISTENT_READ,
    PERM_RESIZE,
    PERM_WRITE,
    PERM_WRITE_UNCHANGED,
    ImageLock,
    perm_names,
)

_FLOCK = struct.Struct("hhqqi4x")
CR, W, WU, RS = PERM_CONSISTENT_READ, PERM_WRITE, PERM_WRITE_UNCHANGED, PERM_RESIZE


def held_by_others(path) -> set:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = set()
        for byte in (*range(100, 104), *range(200, 204)):
            got = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _FLOCK.pack(fcntl.F_WRLCK, 0, byte, 1, 0))
            if _FLOCK.unpack(got)[0] != fcntl.F_UNLCK:
                out.add(byte)
        return out
    finally:
        os.close(fd)


@pytest.fixture
def path(tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"\0" * 4096)
    return str(p)


def test_permission_bits_follow_qemus_order():
    assert (CR, W, WU, RS, PERM_ALL) == (1, 2, 4, 8, 15)
    assert perm_names(CR | RS) == "consistent read, resize"


def test_bytes_follow_perm_and_unshared_masks(path):
    with ImageLock(path, CR | WU, PERM_ALL & ~(W | RS)):
        assert held_by_others(path) == {100, 102, 201, 203}


def test_close_is_idempotent_and_drops_everything(path):
    lk = ImageLock(path, CR | W, CR)
    lk.close()
    lk.close()
    assert not lk.active and held_by_others(path) == set()


def test_change_to_more_permissions_takes_new_bytes_and_drops_old(path):
    with ImageLock(path, CR, PERM_ALL & ~(W | RS)) as lk:
        lk.change(CR | W | RS, PERM_ALL & ~(W | RS))
        assert held_by_others(path) == {100, 101, 103, 201, 203}
        lk.change(CR, PERM_ALL)
        assert held_by_others(path) == {100}
        assert (lk.perm, lk.shared) == (CR, PERM_ALL)


def test_change_refused_keeps_the_old_locks(path):
    with ImageLock(path, CR, PERM_ALL & ~(W | RS)) as mine:
        with ImageLock(path, CR, PERM_ALL & ~W):
            with pytest.raises(ImageLockedError, match='failed to get "write" lock'):
                mine.change(CR | W, PERM_ALL & ~(W | RS))
        assert (mine.perm, mine.shared) == (CR, PERM_ALL & ~(W | RS))
        assert held_by_others(path) == {100, 201, 203}  # byte 101 was taken back


def test_bad_masks_and_modes_are_value_errors(path):
    with pytest.raises(ValueError, match="perm"):
        ImageLock(path, 16, PERM_ALL)
    with pytest.raises(ValueError, match="locking"):
        ImageLock(path, CR, PERM_ALL, locking="sometimes")


def test_locking_off_opens_nothing(tmp_path):
    lk = ImageLock(tmp_path / "missing", CR | W, 0, locking="off")  # not even opened
    assert not lk.active


def test_missing_file_keeps_its_errno(tmp_path):
    with pytest.raises(FileNotFoundError):
        ImageLock(tmp_path / "missing", CR, PERM_ALL)

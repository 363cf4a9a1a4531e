"""FileMapping and zero_granules: file bytes read in place, zero detection, and a file that shrinks
under its mapping (EFAULT instead of SIGBUS)."""

import errno
import signal
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vblock.hostio import HostFile
from vblock.hostio.mapping import FileMapping, zero_granules

PAGE = 4096


def _reference(data, granule):
    return bytes(int(not any(data[i : i + granule])) for i in range(0, len(data), granule))


@given(
    st.lists(st.tuples(st.booleans(), st.integers(1, 300)), max_size=12),
    st.sampled_from([1, 7, 8, 16, 64, 512, 4096]),
    st.integers(0, 255),
)
def test_zero_granules_matches_a_byte_by_byte_scan(runs, granule, fill):
    """Runs of zeros and of data (whose first or last byte alone may be non-zero) in any
    granule size, the last granule short."""
    data = bytearray()
    for zero, n in runs:
        chunk = bytearray(n)
        if not zero:
            chunk[fill % n] = fill or 1
        data += chunk
    assert zero_granules(data, granule) == _reference(data, granule)


def test_zero_granules_of_nothing_and_a_bad_granule():
    assert zero_granules(b"", 4096) == b""
    with pytest.raises(ValueError, match="granule"):
        zero_granules(b"\0" * 8, 0)


def test_views_are_the_files_bytes_in_place(scratch):
    path = scratch / "m.raw"
    data = bytes(3 * PAGE) + b"\x11" * PAGE + bytes(PAGE - 100)
    path.write_bytes(data)
    with FileMapping(path, len(data)) as m:
        v = m.view(2 * PAGE, 2 * PAGE)
        assert v.readonly and bytes(v) == data[2 * PAGE : 4 * PAGE]
        assert zero_granules(m.view(0, len(data)), PAGE) == b"\x01\x01\x01\x00\x01"
        with open(path, "r+b") as f:  # a shared mapping: later changes to the file show
            f.seek(0)
            f.write(b"\x22")
        assert zero_granules(m.view(0, PAGE), PAGE) == b"\x00"
        with pytest.raises(ValueError, match="outside"):
            m.view(len(data) - 10, 11)
        v = m.view(PAGE, 3 * PAGE)
        m.release(PAGE - 1, 3 * PAGE + 2)  # unmaps the whole pages inside only: 1, 2 and 3
        assert bytes(v) == b"\x00" * 2 * PAGE + b"\x11" * PAGE  # read in again
    m.release(0, len(data))  # closed: nothing left to release
    with pytest.raises(ValueError, match="closed"):
        m.view(0, PAGE)


def test_a_file_that_shrinks_under_its_mapping_is_efault_not_sigbus(scratch):
    path = scratch / "s.raw"
    path.write_bytes(b"\x01" * (4 * PAGE))
    m = FileMapping(path, 4 * PAGE)
    with open(path, "r+b") as f:
        f.truncate(PAGE)
    with pytest.raises(OSError) as e:
        zero_granules(m.view(0, 4 * PAGE), PAGE)
    assert e.value.errno == errno.EFAULT and "shrink" in str(e.value)
    assert zero_granules(m.view(0, PAGE), PAGE) == b"\x00"  # what is left still reads
    with HostFile(scratch / "out", direct=False, create=True) as out:
        with pytest.raises(OSError) as e:
            out.pwrite(m.view(2 * PAGE, PAGE), 0)  # the kernel meets the lost page
        assert e.value.errno == errno.EFAULT
        out.pwrite(m.view(0, PAGE), 0)
    assert (scratch / "out").read_bytes() == b"\x01" * PAGE
    m.close()


def test_sigbus_outside_a_scan_still_ends_the_process(scratch):
    """The guard catches faults of its own scans only: any other SIGBUS meets the disposition it
    had before (here the default: the process dies of it)."""
    path = scratch / "b.raw"
    path.write_bytes(b"\x01" * (2 * PAGE))
    code = f"""
import os
from vblock.hostio.mapping import FileMapping, zero_granules
m = FileMapping({str(path)!r}, 2 * {PAGE})
zero_granules(m.view(0, {PAGE}), {PAGE})  # installs the guard's handler
os.truncate({str(path)!r}, 0)
try:
    zero_granules(m.view(0, {PAGE}), {PAGE})
except OSError:
    print("guarded", flush=True)
m._map[0]  # an unguarded read of a lost page
print("survived", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout == "guarded\n"
    assert r.returncode == -signal.SIGBUS

"""The compiled shim: version, constants from the compiler, alignment probe, one real call."""

import errno
import os

import pytest

from vblock.hostio import _binding
from vblock.hostio._binding import ffi, lib


def test_version_matches_package():
    assert ffi.string(lib.vbio_version()).decode() == _binding.EXPECTED_VERSION


# vbio.h's copies of kernel numbers beside the kernel's own, which the shim exports as the C
# compiler read them from <linux/falloc.h> and <unistd.h> (native/build_vbio.py, KERNEL_CDEF).
FALLOCATE_MODES = [
    ("VBIO_FALLOC_KEEP_SIZE", "FALLOC_FL_KEEP_SIZE"),
    ("VBIO_FALLOC_PUNCH_HOLE", "FALLOC_FL_PUNCH_HOLE"),
    ("VBIO_FALLOC_ZERO_RANGE", "FALLOC_FL_ZERO_RANGE"),
]


@pytest.mark.parametrize("ours, kernels", FALLOCATE_MODES)
def test_fallocate_constants_are_the_kernels(ours, kernels):
    assert getattr(lib, ours) == getattr(lib, kernels)


@pytest.mark.parametrize(
    "ours, kernels", [("VBIO_SEEK_DATA", "SEEK_DATA"), ("VBIO_SEEK_HOLE", "SEEK_HOLE")]
)
def test_seek_whence_constants_are_the_kernels(ours, kernels):
    assert getattr(lib, ours) == getattr(lib, kernels) == getattr(os, kernels)


def test_alloc_is_aligned_and_zeroed():
    p = lib.vbio_alloc(10000, 4096)
    try:
        assert int(ffi.cast("uintptr_t", p)) % 4096 == 0
        assert bytes(ffi.buffer(p, 10000)) == bytes(10000)
    finally:
        lib.vbio_free(p)


def test_dio_alignment_probe_answers_a_power_of_two(scratch):
    path = str(scratch / "f")
    open(path, "wb").close()
    fd = ffi.new("int *")
    assert lib.vbio_open(path.encode(), lib.VBIO_O_RDONLY, fd) == 0
    a, m = ffi.new("uint32_t *"), ffi.new("uint32_t *")
    assert lib.vbio_dio_align(fd[0], a, m) == 0
    assert a[0] >= 1 and a[0] & (a[0] - 1) == 0
    assert m[0] >= 1 and m[0] & (m[0] - 1) == 0
    lib.vbio_close(fd[0])


def test_errors_are_negative_errno():
    fd = ffi.new("int *")
    assert lib.vbio_open(b"/nonexistent/vblock", 0, fd) == -errno.ENOENT
    assert lib.vbio_fdatasync(-1) == -errno.EBADF


def test_host_error_names_operation_path_offset():
    exc = _binding.host_error(errno.EIO, "write", "/x/y.img", 4096)
    assert exc.errno == errno.EIO and "write /x/y.img at offset 4096" in str(exc)

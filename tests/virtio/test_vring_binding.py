"""The virtio accelerator's gatekeeper (``vblock.virtio._binding``): the import checks, the fences,
buffer addresses, and the virtio numbers ``vblock.virtio.spec`` restates, held to the kernel's
headers (the accelerator exports the values its C compiler read from them)."""

from __future__ import annotations

import ctypes
import importlib.util
import sys
import types

import pytest

from vblock.virtio import _binding
from vblock.virtio import spec as S

# spec.py's name, the kernel header's name: the same number.
SPEC_AND_KERNEL = [
    ("ACKNOWLEDGE", "VIRTIO_CONFIG_S_ACKNOWLEDGE"),
    ("DRIVER", "VIRTIO_CONFIG_S_DRIVER"),
    ("DRIVER_OK", "VIRTIO_CONFIG_S_DRIVER_OK"),
    ("FEATURES_OK", "VIRTIO_CONFIG_S_FEATURES_OK"),
    ("DEVICE_NEEDS_RESET", "VIRTIO_CONFIG_S_NEEDS_RESET"),
    ("FAILED", "VIRTIO_CONFIG_S_FAILED"),
    ("VIRTIO_F_INDIRECT_DESC", "VIRTIO_RING_F_INDIRECT_DESC"),
    ("VIRTIO_F_EVENT_IDX", "VIRTIO_RING_F_EVENT_IDX"),
    ("VIRTIO_F_VERSION_1", "VIRTIO_F_VERSION_1"),
    ("VIRTIO_F_ACCESS_PLATFORM", "VIRTIO_F_ACCESS_PLATFORM"),
    ("VIRTIO_F_RING_PACKED", "VIRTIO_F_RING_PACKED"),
    ("VIRTIO_F_IN_ORDER", "VIRTIO_F_IN_ORDER"),
    ("VIRTIO_BLK_F_SIZE_MAX", "VIRTIO_BLK_F_SIZE_MAX"),
    ("VIRTIO_BLK_F_SEG_MAX", "VIRTIO_BLK_F_SEG_MAX"),
    ("VIRTIO_BLK_F_GEOMETRY", "VIRTIO_BLK_F_GEOMETRY"),
    ("VIRTIO_BLK_F_RO", "VIRTIO_BLK_F_RO"),
    ("VIRTIO_BLK_F_BLK_SIZE", "VIRTIO_BLK_F_BLK_SIZE"),
    ("VIRTIO_BLK_F_FLUSH", "VIRTIO_BLK_F_FLUSH"),
    ("VIRTIO_BLK_F_TOPOLOGY", "VIRTIO_BLK_F_TOPOLOGY"),
    ("VIRTIO_BLK_F_CONFIG_WCE", "VIRTIO_BLK_F_CONFIG_WCE"),
    ("VIRTIO_BLK_F_MQ", "VIRTIO_BLK_F_MQ"),
    ("VIRTIO_BLK_F_DISCARD", "VIRTIO_BLK_F_DISCARD"),
    ("VIRTIO_BLK_F_WRITE_ZEROES", "VIRTIO_BLK_F_WRITE_ZEROES"),
    ("VIRTIO_BLK_T_IN", "VIRTIO_BLK_T_IN"),
    ("VIRTIO_BLK_T_OUT", "VIRTIO_BLK_T_OUT"),
    ("VIRTIO_BLK_T_FLUSH", "VIRTIO_BLK_T_FLUSH"),
    ("VIRTIO_BLK_T_GET_ID", "VIRTIO_BLK_T_GET_ID"),
    ("VIRTIO_BLK_T_DISCARD", "VIRTIO_BLK_T_DISCARD"),
    ("VIRTIO_BLK_T_WRITE_ZEROES", "VIRTIO_BLK_T_WRITE_ZEROES"),
    ("VIRTIO_BLK_S_OK", "VIRTIO_BLK_S_OK"),
    ("VIRTIO_BLK_S_IOERR", "VIRTIO_BLK_S_IOERR"),
    ("VIRTIO_BLK_S_UNSUPP", "VIRTIO_BLK_S_UNSUPP"),
    ("VIRTQ_DESC_F_NEXT", "VRING_DESC_F_NEXT"),
    ("VIRTQ_DESC_F_WRITE", "VRING_DESC_F_WRITE"),
    ("VIRTQ_DESC_F_INDIRECT", "VRING_DESC_F_INDIRECT"),
    ("VIRTQ_AVAIL_F_NO_INTERRUPT", "VRING_AVAIL_F_NO_INTERRUPT"),
    ("VIRTQ_USED_F_NO_NOTIFY", "VRING_USED_F_NO_NOTIFY"),
    ("RING_EVENT_FLAGS_DESC", "VRING_PACKED_EVENT_FLAG_DESC"),
]


@pytest.mark.parametrize("ours, kernels", SPEC_AND_KERNEL)
def test_spec_constant_is_the_kernels(ours, kernels):
    assert getattr(S, ours) == getattr(_binding.lib, kernels)


@pytest.mark.parametrize(
    "ours, kernels_bit",
    [
        ("VIRTQ_DESC_F_AVAIL", "VRING_PACKED_DESC_F_AVAIL"),
        ("VIRTQ_DESC_F_USED", "VRING_PACKED_DESC_F_USED"),
    ],
)
def test_packed_flag_is_the_kernels_bit(ours, kernels_bit):
    """The kernel names the packed ring's flags by bit number, the spec module by mask."""
    assert getattr(S, ours) == 1 << getattr(_binding.lib, kernels_bit)


def test_version_matches_package():
    assert _binding.ffi.string(_binding.lib.vring_version()).decode() == _binding.EXPECTED_VERSION


def test_fences_are_the_accelerators():
    lib = _binding.lib
    assert (_binding.fence_acquire, _binding.fence_release, _binding.fence_full) == (
        lib.vring_fence_acquire,
        lib.vring_fence_release,
        lib.vring_fence_full,
    )
    assert [f() for f in (_binding.fence_acquire, _binding.fence_release, _binding.fence_full)] == [
        None,
        None,
        None,
    ]


def test_buffer_address_is_the_first_bytes_address():
    buf = bytearray(64)
    expected = ctypes.addressof((ctypes.c_char * 64).from_buffer(buf))
    assert _binding.buffer_address(buf) == expected
    assert _binding.buffer_address(memoryview(buf)[16:]) == expected + 16


def test_buffer_address_takes_read_only_buffers():
    data = b"x" * 32
    view = memoryview(data)
    assert _binding.buffer_address(view[8:]) == _binding.buffer_address(view) + 8


def _import_gatekeeper_copy(monkeypatch, vring):
    """Import a fresh copy of the gatekeeper with ``vring`` standing for the compiled module."""
    monkeypatch.setitem(sys.modules, "vblock.virtio._vring", vring)
    spec = importlib.util.spec_from_file_location("_vring_gatekeeper_copy", _binding.__file__)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_missing_accelerator_is_an_import_error_saying_what_to_do(monkeypatch):
    with pytest.raises(ImportError, match=r"virtio\._vring cannot be imported .*pip install -e \."):
        _import_gatekeeper_copy(monkeypatch, None)  # None in sys.modules: the import fails


def test_stale_accelerator_is_refused_at_import(monkeypatch):
    ffi = _binding.ffi
    old = ffi.new("char[]", b"1")
    stale = types.SimpleNamespace(ffi=ffi, lib=types.SimpleNamespace(vring_version=lambda: old))
    message = f"built from accelerator version 1, this package needs {_binding.EXPECTED_VERSION}"
    with pytest.raises(ImportError, match=message):
        _import_gatekeeper_copy(monkeypatch, stale)

"""A QED file cut short is a corrupt QED image: probing claims it on the magic alone and opening
fails with ImageError naming the field, read-only or not, and writes nothing. Never raw."""

from __future__ import annotations

import hashlib

import pytest

import vblock
from vblock.block import registry
from vblock.drivers.qed import format as fmt
from vblock.errors import ImageError

MiB = 1 << 20


def _full_image():
    h, head = fmt.create_header(MiB)
    return head.ljust(fmt.created_file_length(h.cluster_size, h.table_size), b"\0")


def _open_fails(path, field, **kw):
    data = path.read_bytes()
    assert registry.probe_format(str(path)) == "qed"
    for read_only in (True, False):
        with pytest.raises(ImageError) as info:
            vblock.open_image(path, read_only=read_only, **kw)
        assert info.value.field == field and info.value.path == str(path)
    assert path.read_bytes() == data, "nothing is written to an image that failed to open"
    return hashlib.sha256(data).hexdigest()


def test_qed_magic_alone_is_a_corrupt_header(scratch):
    path = scratch / "magic.qed"
    path.write_bytes(b"QED\0")
    _open_fails(path, "header")


def test_qed_partial_header_is_a_corrupt_header(scratch):
    path = scratch / "partial.qed"
    path.write_bytes(_full_image()[:40])
    _open_fails(path, "header")


def test_qed_partial_header_with_explicit_format_is_a_corrupt_header(scratch):
    path = scratch / "partial.qed"
    path.write_bytes(_full_image()[:63])
    _open_fails(path, "header", format="qed")


def test_qed_header_with_zero_cluster_size_names_cluster_size(scratch):
    path = scratch / "zero-cluster.qed"
    path.write_bytes(fmt.Header(cluster_size=0).pack())
    _open_fails(path, "cluster_size")


def test_qed_file_cut_before_its_l1_table_names_the_l1_table_offset(scratch):
    path = scratch / "cut.qed"
    path.write_bytes(_full_image()[:4096])
    _open_fails(path, "l1_table_offset")

"""Probing foreign formats: every magic in vblock.block.probe is recognised, from hand-made headers
(no qemu-img needed) and from images qemu-img makes; a format with no driver is an
UnknownFormatError naming it, never raw; format="raw" still opens anything."""

from __future__ import annotations

import logging
import shutil
import subprocess

import pytest
from hypothesis import given
from hypothesis import strategies as st

import vblock
from tests.files import digest
from vblock.block import probe, registry
from vblock.block.interface import BlockDriver
from vblock.errors import UnknownFormatError
from vblock.testing import foreign

needs_qemu_img = pytest.mark.skipif(
    shutil.which("qemu-img") is None, reason="qemu-img not installed (apt-get install qemu-utils)"
)


def _write(path, data):
    path.write_bytes(data)
    return path


# -- the table, from hand-made headers --------------------------------------------------------------
@pytest.mark.parametrize("name", foreign.FORMATS)
def test_hand_made_header_is_identified(name):
    data = foreign.sample(name)
    assert (
        probe.identify(data[: registry.PROBE_BYTES], data[-probe.TAIL_BYTES :])
        == foreign.FORMAT_OF[name]
    )


@pytest.mark.parametrize("name", foreign.FORMATS)
def test_hand_made_file_is_an_unknown_format_error_naming_it(scratch, name):
    path = _write(scratch / f"disk.{name}", foreign.sample(name))
    before = digest(path)
    with pytest.raises(UnknownFormatError) as info:
        registry.probe_format(str(path))
    fmt = foreign.FORMAT_OF[name]
    assert info.value.format == fmt
    assert str(info.value) == (
        f"{path}: image format {fmt!r} is not supported (vblock reads raw, qcow2, qed); "
        "convert it with qemu-img convert -O qed"
    )
    with pytest.raises(UnknownFormatError):
        vblock.open_image(path)
    with pytest.raises(UnknownFormatError):
        vblock.open_image(path, read_only=True)
    assert digest(path) == before


@pytest.mark.parametrize("name", foreign.FORMATS)
def test_explicit_raw_opens_a_foreign_file_as_raw(scratch, name):
    data = foreign.sample(name)
    path = _write(scratch / f"disk.{name}", data)
    with vblock.open_image(path, format="raw", read_only=True, cache="writeback") as img:
        assert img.format == "raw"
        n = min(512, img.size)
        assert img.read(0, n) == data[:n]


def test_qed_magic_is_in_the_table_and_served_by_its_driver(scratch):
    assert probe.identify(b"QED\0" + bytes(60)) == "qed"
    path = _write(scratch / "short.qed", b"QED\0")
    assert registry.probe_format(str(path)) == "qed"


def test_a_file_without_magic_is_still_raw_with_a_warning(scratch, caplog):
    path = _write(scratch / "plain.img", bytes(range(256)) * 64)
    with caplog.at_level(logging.WARNING, logger="vblock.block.registry"):
        assert registry.probe_format(str(path)) == "raw"
    assert "opening as raw" in caplog.text


def test_an_empty_file_is_raw(scratch):
    assert registry.probe_format(str(_write(scratch / "empty.img", b""))) == "raw"


def test_a_vhd_footer_with_a_bad_checksum_is_not_vpc(scratch):
    footer = bytearray(foreign.vhd_footer(1 << 20))
    footer[64] ^= 1  # the checksum no longer agrees: this is a raw disk that ends in "conectix"
    path = _write(scratch / "almost.img", bytes(4096) + bytes(footer))
    assert registry.probe_format(str(path)) == "raw"


def test_a_vhd_footer_inside_the_first_sector_of_a_short_file_is_found(scratch):
    # a fixed VHD of a zero-sized disk is the footer alone
    path = _write(scratch / "zero.vhd", foreign.vhd_footer(0))
    with pytest.raises(UnknownFormatError) as info:
        registry.probe_format(str(path))
    assert info.value.format == "vpc"


def test_a_vmdk_descriptor_without_its_comment_line_is_vmdk():
    text = b'version=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType="vmfs"\n\nRW 2048 VMFS "d-flat.vmdk"\n'
    assert probe.identify(text) == "vmdk"
    assert probe.identify(b"version=1\nthis is a text file, not a descriptor\n") is None


def test_a_character_device_is_probed_without_its_tail():
    # /dev/zero reads zeros and cannot seek to an end: nothing to find there, raw
    assert registry.probe_format("/dev/zero") == "raw"


def test_an_unknown_format_name_is_an_error_with_that_format():
    with pytest.raises(UnknownFormatError) as info:
        registry.get_driver("vmdk9")
    assert info.value.format == "vmdk9"


def test_qcow_versions_outside_1_to_3_are_not_claimed():
    head = bytearray(foreign.sample("qcow")[:512])
    head[4:8] = (9).to_bytes(4, "big")
    assert probe.identify(bytes(head)) is None


def test_a_driver_registered_for_a_foreign_format_gets_the_file(scratch):
    class PlainVmdk(BlockDriver):  # a plug-in that serves vmdk but does not probe
        format_name = "vmdk"

    path = _write(scratch / "d.vmdk", foreign.sample("vmdk"))
    registry.register("vmdk", PlainVmdk)
    try:
        assert registry.probe_format(str(path)) == "vmdk"
    finally:
        registry.unregister("vmdk")
    with pytest.raises(UnknownFormatError):
        registry.probe_format(str(path))


def test_a_driver_that_probes_the_file_wins_over_the_table(scratch):
    class Claims(BlockDriver):
        format_name = "claims"

        @classmethod
        def probe(cls, head, path):
            return 50 if head.startswith(b"KDMV") else 0

    path = _write(scratch / "d.vmdk", foreign.sample("vmdk"))
    registry.register("claims", Claims)
    try:
        assert registry.probe_format(str(path)) == "claims"
    finally:
        registry.unregister("claims")


@given(st.binary(max_size=600), st.binary(max_size=512))
def test_identify_never_raises(head, tail):
    assert probe.identify(head, tail) in (None, *(name for name, _ in probe.MAGICS))


@given(
    st.sampled_from([n for n in foreign.FORMATS if n not in ("vpc-fixed", "dmg")]),
    st.binary(max_size=256),
)
def test_whatever_follows_a_header_the_format_is_the_same(name, junk):
    head = foreign.sample(name)[:1024] + junk
    assert probe.identify(head, junk[-512:]) == foreign.FORMAT_OF[name]


# -- images made by qemu-img ------------------------------------------------------------------------
@needs_qemu_img
@pytest.mark.parametrize("name", sorted(foreign.QEMU_IMG_CREATE))
def test_qemu_img_image_is_an_unknown_format_error_naming_it(scratch, name):
    fmt, extra = foreign.QEMU_IMG_CREATE[name]
    path = scratch / f"disk.{name}"
    p = subprocess.run(
        ["qemu-img", "create", "-q", "-f", fmt, *extra, str(path), "1M"],
        capture_output=True,
        text=True,
    )
    if p.returncode != 0:
        pytest.skip(f"this qemu-img cannot create {name}: {p.stderr.strip()}")
    before = digest(path)
    with pytest.raises(UnknownFormatError) as info:
        vblock.open_image(path)
    assert info.value.format == fmt
    assert f"image format {fmt!r} is not supported" in str(info.value)
    assert digest(path) == before

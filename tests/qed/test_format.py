"""Header codec, geometry helpers and open-time checks (drivers/qed/format.py)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vblock.drivers.qed import format as fmt
from vblock.errors import ImageError


def _image(h, file_length=None):
    data = bytearray(h.pack())
    return bytes(data), file_length if file_length is not None else fmt.created_file_length(
        h.cluster_size, h.table_size
    )


def test_header_matches_qemu_bytes_for_raw_backing():
    # reference §10: qemu-img create -f qed -b base.raw -F raw h2.qed 1G
    h, head = fmt.create_header(1 << 30, backing_file="base.raw", backing_fmt="raw")
    expect = bytes.fromhex(
        "51454400000001000400000001000000"
        "05000000000000000000000000000000"
        "00000000000000000000010000000000"
        "00000040000000004000000008000000"
        "626173652e726177"
    )
    assert head == expect


def test_header_without_backing_has_zero_feature_and_name_fields():
    h, head = fmt.create_header(1000)
    assert len(head) == 64
    assert head[0x10:0x18] == bytes(8) and head[0x38:0x40] == bytes(8)
    assert h.image_size == 1024  # rounded up to 512 (iotest 104)
    assert fmt.create_header(1234)[0].image_size == 1536


def test_non_raw_backing_format_is_probed_later():
    h, _ = fmt.create_header(1 << 20, backing_file="b.qed", backing_fmt="qed")
    assert h.features == fmt.F_BACKING_FILE


@given(
    st.builds(
        fmt.Header,
        **{
            name: st.integers(0, 2**32 - 1)
            for name in (
                "magic",
                "cluster_size",
                "table_size",
                "header_size",
                "backing_filename_offset",
                "backing_filename_size",
            )
        },
        **{
            name: st.integers(0, 2**64 - 1)
            for name in (
                "features",
                "compat_features",
                "autoclear_features",
                "l1_table_offset",
                "image_size",
            )
        },
    )
)
def test_header_round_trip(h):
    data = h.pack()
    assert len(data) == 64
    assert fmt.Header.unpack(data) == h
    assert fmt.Header.unpack(data + b"trailing garbage") == h


def test_header_unpack_needs_64_bytes():
    with pytest.raises(ValueError):
        fmt.Header.unpack(bytes(63))


@pytest.mark.parametrize(
    "cs,ts,expect",
    [
        (4096, 1, 1 << 30),
        (4096, 4, 16 << 30),
        (4096, 16, 256 << 30),
        (65536, 4, 64 << 40),
        (65536, 16, 1 << 50),
        (2 << 20, 16, 0),
        (4 << 20, 4, 0),
        (64 << 20, 1, 0),
    ],
)
def test_max_image_size_wraps_like_qemu(cs, ts, expect):
    assert fmt.max_image_size(cs, ts) == expect
    assert fmt.max_image_size_wraps(cs, ts) == (expect == 0)


def test_create_refuses_wrapping_geometry_and_bad_sizes():
    with pytest.raises(ValueError, match="wraps"):
        fmt.create_header(0, cluster_size=64 << 20, table_size=1)
    with pytest.raises(ValueError, match="cluster size"):
        fmt.create_header(0, cluster_size=3000)
    with pytest.raises(ValueError, match="table size"):
        fmt.create_header(0, table_size=3)
    with pytest.raises(ValueError, match="at most"):
        fmt.create_header((64 << 40) + 512)
    assert fmt.create_header(64 << 40)[0].image_size == 64 << 40


def test_geometry_helpers():
    g = fmt.Geometry(65536, 4)
    assert g.table_entries == 32768 and g.l2_span == 2 << 30
    pos = (3 << 31) + 5 * 65536 + 17
    assert g.l1_index(pos) == 3
    assert g.l2_index(pos) == 5
    assert g.offset_into_cluster(pos) == 17
    assert g.start_of_cluster(pos) == pos - 17


@given(st.integers(0, 1 << 40))
def test_bytes_to_clusters_is_exact(n):
    # QEMU divides by cluster_size - 1 (§3.3): ours must be a plain ceiling division.
    g = fmt.Geometry(4096, 1)
    assert g.bytes_to_clusters(n) == -(-n // 4096)


def test_bytes_to_clusters_at_qemus_breaking_point():
    g = fmt.Geometry(4096, 16)
    assert g.bytes_to_clusters(4095 * 4096) == 4095
    assert g.bytes_to_clusters(32 << 20) == 8192


def test_table_offset_valid_for_table_size_one():
    # QEMU's overflow guard rejects every table_size=1 image (§2 step 8); we must not.
    g = fmt.Geometry(4096, 1)
    assert g.table_offset_valid(4096, 8192)
    assert not g.table_offset_valid(4096, 4096)
    assert not g.table_offset_valid(0, 8192)  # inside the header
    assert not g.table_offset_valid(4097, 16384)  # unaligned


# -- open checks, in QEMU's order (iotest 116 in our words) ------------------------------------

GOOD = fmt.create_header(128 << 20)[0]
GOOD_LEN = fmt.created_file_length(GOOD.cluster_size, GOOD.table_size)


def _validate(h, length=GOOD_LEN):
    return fmt.validate(h.pack(), length, "img.qed")


def test_validate_accepts_created_header():
    assert _validate(GOOD) == GOOD


@pytest.mark.parametrize(
    "changes,length,field,message",
    [
        ({}, 512, "l1_table_offset", "QED table offset is invalid"),  # truncated to 512 bytes
        ({"magic": 0x12345678}, GOOD_LEN, "magic", "Image not in QED format"),
        ({"features": 0x08}, GOOD_LEN, "features", "Unsupported QED features: 0x8"),
        ({"cluster_size": 0xFFFFFFFF}, GOOD_LEN, "cluster_size", "QED cluster size is invalid"),
        ({"table_size": 0xFFFFFFFF}, GOOD_LEN, "table_size", "QED table size is invalid"),
        ({"header_size": 0xFFFFFFFF}, GOOD_LEN, "l1_table_offset", "QED table offset is invalid"),
        ({"l1_table_offset": 2**64 - 1}, GOOD_LEN, "l1_table_offset", "table offset is invalid"),
        ({"image_size": 2**64 - 1}, GOOD_LEN, "image_size", "QED image size is invalid"),
        ({"image_size": 1000}, GOOD_LEN, "image_size", "QED image size is invalid"),
    ],
)
def test_validate_names_the_field(changes, length, field, message):
    with pytest.raises(ImageError) as info:
        _validate(GOOD.with_(**changes), length)
    assert info.value.field == field
    assert message in str(info.value)
    assert info.value.path == "img.qed"


def test_validate_order_magic_before_features_before_cluster_size():
    bad = GOOD.with_(magic=0, features=0x80, cluster_size=3)
    with pytest.raises(ImageError) as info:
        _validate(bad)
    assert info.value.field == "magic"
    with pytest.raises(ImageError) as info:
        _validate(bad.with_(magic=fmt.MAGIC))
    assert info.value.field == "features"


def test_validate_header_size_too_large():
    # l1 offset valid only if header_size*cs <= l1 offset: make a huge file so that passes
    h = GOOD.with_(header_size=65537, l1_table_offset=65537 * 65536)
    with pytest.raises(ImageError) as info:
        _validate(h, 65537 * 65536 + 4 * 65536)
    assert info.value.field == "header_size"


def test_validate_backing_name_bounds():
    h = GOOD.with_(
        features=fmt.F_BACKING_FILE, backing_filename_offset=65000, backing_filename_size=600
    )
    with pytest.raises(ImageError) as info:
        _validate(h)
    assert info.value.field == "backing_filename_offset"
    h = GOOD.with_(
        features=fmt.F_BACKING_FILE, backing_filename_offset=64, backing_filename_size=5000
    )
    with pytest.raises(ImageError) as info:
        _validate(h)
    assert info.value.field == "backing_filename_size"
    # without the feature bit the fields are not consulted
    assert _validate(GOOD.with_(backing_filename_offset=65000, backing_filename_size=600))


def test_validate_short_file():
    with pytest.raises(ImageError) as info:
        fmt.validate(b"QED\0", 4, "x")
    assert info.value.field == "header"


def test_probe():
    assert fmt.probe(GOOD.pack()) == 100
    assert fmt.probe(b"\0" * 64) == 0
    assert fmt.probe(b"QED") == 0  # not even the whole magic


@given(st.integers(4, 63))
def test_probe_claims_a_short_header_on_the_magic_alone(n):
    # a QED file cut short is a corrupt QED image, never raw
    assert fmt.probe(GOOD.pack()[:n]) == 100


def test_backing_name_read_from_header_area():
    h, head = fmt.create_header(1 << 20, backing_file="dir/base img.raw")
    assert fmt.backing_name(h, head + bytes(100)) == "dir/base img.raw"
    assert fmt.backing_name(GOOD, GOOD.pack()) is None


def test_backing_name_with_a_nul_byte_names_the_field():
    h, head = fmt.create_header(1 << 20, backing_file="base\0.raw")
    with pytest.raises(ImageError) as info:
        fmt.backing_name(h, head, "top.qed")
    assert info.value.field == "backing_filename" and "NUL" in str(info.value)


@given(st.integers(0, 63))
def test_validate_every_short_prefix_names_the_header(n):
    with pytest.raises(ImageError) as info:
        fmt.validate(GOOD.pack()[:n], n, "p")
    assert info.value.field == "header"

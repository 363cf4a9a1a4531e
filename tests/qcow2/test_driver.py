"""The read-only qcow2 driver on hand-made images (``vblock.testing.qcow2_image``; no qemu-img):
every cluster type reads back, hostile headers and tables raise ImageError naming the field,
refusals are one clear line, and the check counts what it should."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vblock
from tests.files import digest
from vblock.block import registry
from vblock.errors import ImageError, UnsupportedError
from vblock.testing.qcow2_image import ZERO, build

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB


def _write(path, built):
    path.write_bytes(built.data if hasattr(built, "data") else built)
    return path


def _read_all(path, **kw):
    with vblock.open_image(str(path), read_only=True, **kw) as img:
        return img.read(0, img.size)


def _pattern(seed, n):
    return bytes((seed * 31 + i * 7) & 0xFF for i in range(n))


def _model(size, clusters, cs, backing=None):
    """What the guest should read."""
    out = bytearray(backing[:size].ljust(size, b"\0") if backing is not None else bytes(size))
    for g, spec in clusters.items():
        pos = g * cs
        if isinstance(spec, bytes):
            data = spec.ljust(cs, b"\0")
        elif spec == ZERO:
            data = bytes(cs)
        elif spec[0] == "compressed":
            data = spec[1].ljust(cs, b"\0")
        else:
            raise AssertionError(spec)
        out[pos : pos + cs] = data[: max(0, min(cs, size - pos))]
    return bytes(out)


# -- reading ---------------------------------------------------------------------------------------
def test_probe_names_a_hand_made_image_qcow2(scratch):
    path = _write(scratch / "d.qcow2", build(MiB))
    assert registry.probe_format(str(path)) == "qcow2"


@pytest.mark.parametrize("version", [2, 3])
def test_normal_and_unallocated_clusters_read_back(scratch, version):
    clusters = {0: _pattern(1, CS), 3: _pattern(2, CS), 15: _pattern(3, 100)}
    path = _write(scratch / "d.qcow2", build(MiB, clusters, version=version))
    assert _read_all(path) == _model(MiB, clusters, CS)


@pytest.mark.parametrize("bits", [9, 12, 16, 21])
def test_every_cluster_size_reads_back(scratch, bits):
    cs = 1 << bits
    size = 4 * MiB
    clusters = {
        0: _pattern(1, cs),
        1: ("compressed", _pattern(2, cs)),
        2: ZERO,
        (size // cs) - 1: _pattern(4, cs),
    }
    path = _write(scratch / "d.qcow2", build(size, clusters, cluster_bits=bits))
    assert _read_all(path) == _model(size, clusters, cs)


@pytest.mark.parametrize("ctype", [0, 1], ids=["deflate", "zstd"])
def test_compressed_clusters_read_back(scratch, ctype):
    clusters = {g: ("compressed", _pattern(g, CS)) for g in range(5)}
    clusters[7] = ("compressed", bytes(CS))
    path = _write(scratch / "d.qcow2", build(MiB, clusters, compression_type=ctype))
    assert _read_all(path) == _model(MiB, clusters, CS)


def test_zero_cluster_hides_the_backing_file(scratch):
    base = scratch / "base.raw"
    base.write_bytes(b"\x5a" * MiB)
    clusters = {1: ZERO, 2: _pattern(9, CS)}
    path = _write(
        scratch / "top.qcow2", build(MiB, clusters, backing="base.raw", backing_fmt="raw")
    )
    assert _read_all(path) == _model(MiB, clusters, CS, backing=b"\x5a" * MiB)


def test_a_shorter_backing_file_reads_zeros_past_its_end(scratch):
    base = scratch / "base.raw"
    base.write_bytes(b"\x11" * (CS + 512))
    path = _write(scratch / "top.qcow2", build(MiB, {}, backing="base.raw", backing_fmt="raw"))
    assert _read_all(path) == (b"\x11" * (CS + 512)).ljust(MiB, b"\0")


def test_v2_image_without_format_extension_probes_its_backing_file(scratch):
    base = _write(scratch / "base.qcow2", build(MiB, {0: _pattern(5, CS)}))
    path = _write(
        scratch / "top.qcow2", build(MiB, {1: _pattern(6, CS)}, version=2, backing=base.name)
    )
    assert _read_all(path) == _pattern(5, CS) + _pattern(6, CS) + bytes(MiB - 2 * CS)


def test_extended_l2_subclusters_read_each_kind(scratch):
    base = scratch / "base.raw"
    base.write_bytes(b"\x77" * MiB)
    sc = CS // 32
    host = _pattern(3, CS)
    alloc, zero = 0x0000FFFF, 0x00FF0000  # 0-15 data, 16-23 zeros, 24-31 from the backing file
    path = _write(
        scratch / "top.qcow2",
        build(
            MiB,
            {0: ("sub", host, alloc, zero), 1: ZERO, 2: _pattern(4, CS)},
            extended_l2=True,
            backing="base.raw",
            backing_fmt="raw",
        ),
    )
    got = _read_all(path)
    assert got[: 16 * sc] == host[: 16 * sc]
    assert got[16 * sc : 24 * sc] == bytes(8 * sc)
    assert got[24 * sc : CS] == b"\x77" * (8 * sc)
    assert got[CS : 2 * CS] == bytes(CS)
    assert got[2 * CS : 3 * CS] == _pattern(4, CS)
    assert got[3 * CS :] == b"\x77" * (MiB - 3 * CS)


def test_dirty_lazy_refcount_image_reads(scratch):
    clusters = {0: _pattern(1, CS)}
    path = _write(scratch / "d.qcow2", build(MiB, clusters, lazy_refcounts=True, dirty=True))
    assert _read_all(path) == _model(MiB, clusters, CS)
    with vblock.open_image(str(path), read_only=True) as img:
        assert img.info()["dirty-flag"] is True
        assert img.info()["format-specific"]["data"]["lazy-refcounts"] is True


def test_contiguous_clusters_are_one_host_read(scratch):
    clusters = {g: _pattern(g, CS) for g in range(8)}
    path = _write(scratch / "d.qcow2", build(MiB, clusters))
    with vblock.open_image(str(path), read_only=True) as img:
        img.read(0, CS)  # loads the L2 table
        f = img.driver.f
        calls = []
        real = f.submit_read
        f.submit_read = lambda off, bufs: (
            calls.append((off, sum(map(len, bufs)))) or real(off, bufs)
        )
        data = img.read(0, 8 * CS)
    assert data == b"".join(clusters[g] for g in range(8))
    assert calls == [(calls[0][0], 8 * CS)]


def test_l2_cache_stays_within_its_bound(scratch):
    cs = 4 * KiB
    per_table = cs // 8
    clusters = {t * per_table: _pattern(t, cs) for t in range(6)}
    size = 6 * per_table * cs
    path = _write(scratch / "d.qcow2", build(size, clusters, cluster_bits=12))
    with vblock.open_image(str(path), read_only=True, l2_cache_size=2) as img:
        for t in range(6):
            assert img.read(t * per_table * cs, cs) == _pattern(t, cs)
        assert len(img.driver.cache) <= 2


def test_block_status_reports_each_kind(scratch):
    clusters = {0: _pattern(1, CS), 1: _pattern(2, CS), 2: ZERO, 3: ("compressed", _pattern(3, CS))}
    built = build(MiB, clusters)
    path = _write(scratch / "d.qcow2", built)
    with vblock.open_image(str(path), read_only=True) as img:
        runs = [
            (r.offset, r.length, r.kind, r.host_offset is not None)
            for r in img.driver.block_status(0, MiB)
        ]
    assert runs == [
        (0, 2 * CS, "data", True),
        (2 * CS, CS, "zero", False),
        (3 * CS, CS, "data", False),
        (4 * CS, MiB - 4 * CS, "unallocated", False),
    ]


def test_a_qcow2_may_back_a_qed_image(scratch):
    base = _write(scratch / "base.qcow2", build(MiB, {0: _pattern(1, CS), 2: _pattern(2, CS)}))
    top = scratch / "top.qed"
    with vblock.create_image(
        str(top), "qed", MiB, backing_file="base.qcow2", backing_fmt="qcow2"
    ) as img:
        img.write(CS, b"\x01" * CS)
    assert base.exists()
    assert _read_all(top) == _pattern(1, CS) + b"\x01" * CS + _pattern(2, CS) + bytes(MiB - 3 * CS)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.dictionaries(
        st.integers(0, 31),
        st.one_of(
            st.binary(min_size=1, max_size=64).map(lambda b: (b * 128)[:4096]),
            st.just(ZERO),
            st.binary(min_size=1, max_size=16).map(lambda b: ("compressed", (b * 256)[:4096])),
        ),
        max_size=12,
    ),
    st.sampled_from([0, 1]),
    st.integers(0, 127 * 1024),
    st.integers(1, 16 * 1024),
)
def test_any_layout_reads_as_its_model(scratch, clusters, ctype, offset, length):
    cs = 4096
    size = 32 * cs
    path = _write(
        scratch / "p.qcow2", build(size, clusters, cluster_bits=12, compression_type=ctype)
    )
    length = min(length, size - offset)
    with vblock.open_image(str(path), read_only=True) as img:
        assert img.read(offset, length) == _model(size, clusters, cs)[offset : offset + length]


# -- refusals --------------------------------------------------------------------------------------
def test_read_write_open_is_refused_pointing_to_conversion(scratch):
    path = _write(scratch / "d.qcow2", build(MiB, {0: b"x"}))
    before = digest(path)
    with pytest.raises(UnsupportedError) as info:
        vblock.open_image(str(path))
    assert "read-only" in str(info.value) and "convert" in str(info.value)
    assert digest(path) == before


def _patched(scratch, offset, fmt_, value, **kw):
    data = bytearray(build(MiB, {0: _pattern(1, CS)}, **kw).data)
    struct.pack_into(fmt_, data, offset, value)
    return _write(scratch / "bad.qcow2", bytes(data))


@pytest.mark.parametrize("method,name", [(1, "AES"), (2, "LUKS")])
def test_encrypted_images_are_refused(scratch, method, name):
    path = _patched(scratch, 32, ">I", method)
    with pytest.raises(
        UnsupportedError, match=f"encrypted qcow2 images \\({name}\\) are not supported"
    ):
        vblock.open_image(str(path), read_only=True)


def test_an_external_data_file_is_refused_for_now(scratch):
    path = _patched(scratch, 72, ">Q", 1 << 2)
    with pytest.raises(UnsupportedError, match="external data file are not supported yet"):
        vblock.open_image(str(path), read_only=True)


@pytest.mark.parametrize(
    "offset,fmt_,value,field,message",
    [
        (4, ">I", 4, "version", "Unsupported qcow2 version 4"),
        (20, ">I", 22, "cluster_bits", "Unsupported cluster size: 2^22"),
        (100, ">I", 96, "header_length", "qcow2 header too short"),
        (72, ">Q", 1 << 5, "incompatible_features", "Unknown incompatible feature: 20"),
        (96, ">I", 7, "refcount_order", "may not exceed 64 bits"),
        (56, ">I", 0, "refcount_table_clusters", "does not contain a reference count table"),
        (56, ">I", 20, "refcount_table", "past the end of file"),
        (56, ">I", 200, "refcount_table", "Reference count table too large"),
        (36, ">I", 5 << 20, "l1_size", "Active L1 table too large"),
        (40, ">Q", 0x1000000, "l1_table_offset", "past the end of file"),
        (40, ">Q", 0x10200, "l1_table_offset", "offset invalid"),
        (24, ">Q", 1 << 40, "l1_size", "L1 table is too small"),
        (60, ">I", 70000, "nb_snapshots", "Snapshot table too large"),
        (8, ">Q", 1 << 17, "backing_file_offset", "Invalid backing file offset"),
    ],
)
def test_corrupt_header_field_is_an_image_error_naming_it(
    scratch, offset, fmt_, value, field, message
):
    path = _patched(scratch, offset, fmt_, value)
    before = digest(path)
    with pytest.raises(ImageError) as info:
        vblock.open_image(str(path), format="qcow2", read_only=True)
    assert info.value.field == field
    assert message in info.value.message
    assert digest(path) == before


def _with_l2_entry(scratch, entry, bitmap=None, **kw):
    clusters = {0: ("raw", entry) if bitmap is None else ("raw", entry, bitmap)}
    return _write(scratch / "bad.qcow2", build(MiB, clusters, **kw))


def _read_error(path, offset=0, length=CS):
    with vblock.open_image(str(path), read_only=True) as img:
        with pytest.raises(ImageError) as info:
            img.read(offset, length)
    return info.value


def test_v2_zero_bit_is_an_image_error(scratch):
    err = _read_error(_with_l2_entry(scratch, 1, version=2))
    assert err.field == "l2_table" and "Zero cluster entry found in pre-v3 image" in err.message


def test_unaligned_data_offset_is_an_image_error(scratch):
    err = _read_error(_with_l2_entry(scratch, 0x50200))
    assert err.field == "l2_table" and "Cluster allocation offset 0x50200 unaligned" in err.message


def test_data_offset_past_the_end_of_file_is_an_image_error(scratch):
    err = _read_error(_with_l2_entry(scratch, 1 << 40))
    assert err.field == "l2_table" and "past the end of file" in err.message


def test_compressed_offset_past_the_end_of_file_is_an_image_error(scratch):
    err = _read_error(_with_l2_entry(scratch, (1 << 62) | (1 << 40)))
    assert err.field == "l2_table" and "past the end of file" in err.message


def test_garbage_compressed_data_is_an_image_error(scratch):
    # a compressed entry pointing at the refcount table: not a deflate stream of one cluster
    err = _read_error(_with_l2_entry(scratch, (1 << 62) | CS))
    assert err.field == "l2_table" and "compressed cluster" in err.message


def test_invalid_subcluster_bitmap_is_an_image_error(scratch):
    path = _with_l2_entry(scratch, 0, 0x1, extended_l2=True)  # allocated bit without a cluster
    err = _read_error(path)
    assert err.field == "l2_table" and "Invalid cluster entry found" in err.message


def test_l2_table_past_the_end_of_file_is_an_image_error(scratch):
    built = build(MiB, {0: _pattern(1, CS)})
    data = bytearray(built.data)
    struct.pack_into(">Q", data, built.layout["l1_table"], 1 << 40)
    path = _write(scratch / "bad.qcow2", bytes(data))
    err = _read_error(path)
    assert err.field == "l1_table" and "invalid L2 table offset" in err.message


def test_a_backing_file_that_is_the_image_itself_is_refused(scratch):
    path = _write(scratch / "loop.qcow2", build(MiB, {}, backing="loop.qcow2", backing_fmt="qcow2"))
    with pytest.raises(ImageError) as info:
        vblock.open_image(str(path), read_only=True)
    assert info.value.field == "backing_file" and "loop" in info.value.message


# -- check -----------------------------------------------------------------------------------------
def _check(path):
    with vblock.open_image(str(path), read_only=True, no_backing=True) as img:
        return img.check()


def test_check_of_a_consistent_image_is_clean(scratch):
    path = _write(
        scratch / "d.qcow2", build(MiB, {0: _pattern(1, CS), 2: ("compressed", bytes(CS))})
    )
    r = _check(path)
    assert (r["corruptions"], r["leaks"], r["check-errors"]) == (0, 0, 0)
    assert (r["allocated-clusters"], r["compressed-clusters"]) == (2, 1)


def test_check_counts_a_raised_refcount_as_a_leak(scratch):
    built = build(MiB, {0: _pattern(1, CS)})
    data = bytearray(built.data)
    struct.pack_into(">H", data, built.layout["refcount_blocks"], 2)  # cluster 0 counted twice
    r = _check(_write(scratch / "d.qcow2", bytes(data)))
    assert (r["leaks"], r["corruptions"]) == (1, 0)


def test_check_counts_a_missing_refcount_as_a_corruption(scratch):
    built = build(MiB, {0: _pattern(1, CS)})
    data = bytearray(built.data)
    struct.pack_into(">H", data, built.layout["refcount_blocks"], 0)  # the header uncounted
    r = _check(_write(scratch / "d.qcow2", bytes(data)))
    assert r["corruptions"] == 1 and r["leaks"] == 0

"""create, info, check, map, resize, rebase, compare, convert: outputs, exit codes, bad inputs, and
destinations that are never left half-written."""

from __future__ import annotations

import json
import os
import struct

import pytest

import vblock
from tests.cli.clitools import run_cli

MiB = 1 << 20
CS = 64 << 10  # default QED cluster size


def make_qed(path, size=16 * MiB, writes=(), backing=None, backing_fmt=None):
    """A QED image made by vblock with ``writes`` [(offset, bytes)] in it."""
    opts = {}
    if backing:
        opts = {"backing_file": backing, "backing_fmt": backing_fmt}
    img = vblock.create_image(str(path), "qed", size, **opts)
    try:
        for off, data in writes:
            img.write(off, data)
    finally:
        img.close()
    return path


def one_error_line(r, *fragments):
    assert r.rc == 1, (r.out, r.err)
    assert len(r.err_lines) == 1, r.err
    line = r.err_lines[0]
    assert line.startswith("vblock: error: ") and "Traceback" not in r.err
    for f in fragments:
        assert f in line, line
    return line


# -- create -----------------------------------------------------------------------------------------
def test_create_qed_with_options(scratch):
    p = scratch / "a.qed"
    r = run_cli("create", "-f", "qed", "-o", "cluster_size=4k,table_size=2", p, "10M")
    assert r.rc == 0, r.err
    with vblock.open_image(str(p), read_only=True) as img:
        assert (img.format, img.size, img.info()["cluster-size"], img.info()["table-size"]) == (
            "qed",
            10 * MiB,
            4096,
            2,
        )
    assert not [n for n in os.listdir(scratch) if n.endswith(".tmp")]


def test_create_with_backing_takes_its_size_and_records_raw(scratch):
    base = scratch / "base.raw"
    base.write_bytes(b"\x11" * (3 * MiB))
    r = run_cli("create", "-f", "qed", "-b", "base.raw", "-F", "raw", scratch / "top.qed")
    assert r.rc == 0, r.err
    with vblock.open_image(str(scratch / "top.qed"), read_only=True) as img:
        assert img.size == 3 * MiB
        info = img.info()
        assert info["backing-filename"] == "base.raw" and info["backing-filename-format"] == "raw"
        assert img.read(MiB, 4) == b"\x11" * 4


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["create", "-f", "qed", "{d}/x.qed", "10Q"], ["invalid size '10Q'"]),
        (["create", "-f", "qcow9", "{d}/x.qed", "1G"], ["unknown format 'qcow9'"]),
        (
            ["create", "-f", "qed", "-b", "nothere.raw", "-F", "raw", "{d}/x.qed", "1G"],
            ["nothere.raw", "No such file"],
        ),
        (["create", "-f", "qed", "-o", "cluster_size=3000", "{d}/x.qed", "1G"], ["cluster"]),
        (["create", "-f", "qed", "-o", "bogus=1", "{d}/x.qed", "1G"], ["bogus"]),
        (["create", "-f", "qed", "{d}/no/such/dir/x.qed", "1G"], ["no such directory"]),
        (["create", "-f", "qed", "{d}/x.qed"], ["size is required"]),
    ],
)
def test_create_bad_inputs_leave_nothing_behind(scratch, argv, fragments):
    r = run_cli(*[a.format(d=scratch) for a in argv])
    one_error_line(r, *fragments)
    assert os.listdir(scratch) == []


def test_create_never_leaves_a_half_written_file(scratch, monkeypatch):
    """A failure after the image was started (here: the rename) removes the temporary file and
    leaves an existing destination untouched."""
    dst = scratch / "keep.raw"
    dst.write_bytes(b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device", str(dst))

    monkeypatch.setattr(os, "replace", boom)
    r = run_cli("create", "-f", "qed", dst, "1G")
    one_error_line(r, "No space left on device")
    assert dst.read_bytes() == b"old"
    assert sorted(os.listdir(scratch)) == ["keep.raw"]


# -- info -------------------------------------------------------------------------------------------
def test_info_text_and_json(scratch):
    p = make_qed(scratch / "i.qed", writes=[(0, b"\x01" * CS)])
    r = run_cli("info", p)
    assert r.rc == 0
    lines = r.out.splitlines()
    assert lines[:3] == [f"image: {p}", "file format: qed", "virtual size: 16 MiB (16777216 bytes)"]
    assert "cluster_size: 65536" in lines and "dirty flag: no" in lines
    d = json.loads(run_cli("info", "--output=json", p).out)
    assert d["format"] == "qed" and d["virtual-size"] == 16 * MiB and d["cluster-size"] == CS
    assert d["dirty-flag"] is False and d["filename"] == str(p)
    assert d["actual-size"] == os.stat(p).st_blocks * 512


def test_info_reads_the_dirty_flag_from_the_header_without_clearing_it(scratch):
    p = make_qed(scratch / "d.qed")
    with open(p, "r+b") as f:  # set QED_F_NEED_CHECK by hand
        f.seek(16)
        features = struct.unpack("<Q", f.read(8))[0]
        f.seek(16)
        f.write(struct.pack("<Q", features | 2))
    d = json.loads(run_cli("info", "--output=json", p).out)
    assert d["dirty-flag"] is True
    with open(p, "rb") as f:
        f.seek(16)
        assert struct.unpack("<Q", f.read(8))[0] & 2


def test_info_backing_chain_json_lists_every_layer(scratch):
    (scratch / "base.raw").write_bytes(bytes(MiB))
    make_qed(scratch / "mid.qed", MiB, backing="base.raw", backing_fmt="raw")
    make_qed(scratch / "top.qed", MiB, backing="mid.qed", backing_fmt="qed")
    chain = json.loads(run_cli("info", "--output=json", "--backing-chain", scratch / "top.qed").out)
    assert [d["format"] for d in chain] == ["qed", "qed", "raw"]
    assert chain[0]["backing-filename"] == "mid.qed" and chain[1]["backing-filename"] == "base.raw"


def test_info_bad_inputs(scratch):
    one_error_line(run_cli("info", scratch / "nope.qed"), "nope.qed", "No such file or directory")
    one_error_line(run_cli("info", scratch), "Is a directory")
    one_error_line(run_cli("info", "-f", "vmdk", scratch / "x"), "unknown format 'vmdk'")
    bad = scratch / "bad.qed"
    make_qed(bad)
    with open(bad, "r+b") as f:  # cluster_size 3 KiB: not a power of two
        f.seek(4)
        f.write(struct.pack("<I", 3072))
    one_error_line(run_cli("info", bad), "bad.qed", "cluster_size")
    (scratch / "base.raw").write_bytes(bytes(MiB))
    orphan = make_qed(scratch / "orphan.qed", MiB, backing="base.raw", backing_fmt="raw")
    os.unlink(scratch / "base.raw")
    # only the chain needs the missing backing file (info of the image alone shows it: see
    # test_formats.py)
    one_error_line(run_cli("info", "--backing-chain", orphan), "orphan.qed", "base.raw")


# -- check ------------------------------------------------------------------------------------------
def _l2_entry_offset(path, l1_index=0, l2_index=0):
    with open(path, "rb") as f:
        f.seek(40)
        l1 = struct.unpack("<Q", f.read(8))[0]
        f.seek(l1 + 8 * l1_index)
        l2 = struct.unpack("<Q", f.read(8))[0]
    return l2 + 8 * l2_index


def test_check_clean_leaks_and_corruptions_exit_codes(scratch):
    p = make_qed(scratch / "c.qed", writes=[(0, b"\x05" * CS), (CS, b"\x06" * CS)])
    r = run_cli("check", p)
    assert r.rc == 0
    first, stats = r.out.splitlines()
    assert first == "No errors were found on the image."
    assert stats.startswith("2/256 = 0.78% allocated, ") and stats.endswith(
        "% fragmented, 0.00% compressed clusters"
    )
    with open(p, "r+b") as f:  # one unreferenced cluster at the end: a leak
        f.truncate(os.path.getsize(p) + CS)
    r = run_cli("check", "--output=json", p)
    assert r.rc == 3
    assert json.loads(r.out)["leaks"] == 1
    with open(p, "r+b") as f:  # L2[1] -> far past the end of the file: a corruption
        f.seek(_l2_entry_offset(p, 0, 1))
        f.write(struct.pack("<Q", 1000 * CS))
    r = run_cli("check", p)
    assert r.rc == 2
    assert "1 errors were found on the image." in r.out
    r = run_cli("check", "-r", "all", p)
    assert r.rc == 0, r.out
    assert "The following inconsistencies were found and repaired:" in r.out
    assert run_cli("check", p).rc == 0


def test_check_raw_is_not_supported_63(scratch):
    p = scratch / "r.raw"
    p.write_bytes(bytes(MiB))
    r = run_cli("check", "-f", "raw", p)
    assert r.rc == 63
    assert r.err_lines == [f"vblock: error: {p}: format 'raw' does not support checks"]


# -- map --------------------------------------------------------------------------------------------
def test_map_json_and_human(scratch):
    p = make_qed(scratch / "m.qed", writes=[(2 * MiB, b"\x07" * CS)])
    entries = json.loads(run_cli("map", "--output=json", p).out)
    assert [(e["start"], e["length"], e["data"], e["present"]) for e in entries] == [
        (0, 2 * MiB, False, False),
        (2 * MiB, CS, True, True),
        (2 * MiB + CS, 14 * MiB - CS, False, False),
    ]
    assert entries[1]["offset"] % CS == 0 and "offset" not in entries[0]
    human = run_cli("map", p).out.splitlines()
    assert human[0].split() == ["Offset", "Length", "Mapped", "to", "File"]
    assert human[1].split() == ["0x200000", "0x10000", hex(entries[1]["offset"]), str(p)]


# -- resize / rebase --------------------------------------------------------------------------------
def test_resize_grow_relative_and_shrink_rules(scratch):
    p = make_qed(scratch / "g.qed", 16 * MiB)
    assert run_cli("resize", p, "+16M").rc == 0
    with vblock.open_image(str(p), read_only=True) as img:
        assert img.size == 32 * MiB
    one_error_line(run_cli("resize", p, "8M"), "--shrink")
    one_error_line(run_cli("resize", "--shrink", p, "8M"), "shrink")  # QED cannot shrink
    raw = scratch / "r.raw"
    raw.write_bytes(bytes(4 * MiB))
    assert run_cli("resize", "-f", "raw", "--shrink", raw, "1M").rc == 0
    assert raw.stat().st_size == MiB
    one_error_line(run_cli("resize", "-f", "raw", raw, "10Q"), "invalid size '10Q'")


def test_rebase_unsafe_switches_the_backing_file(scratch):
    (scratch / "a.raw").write_bytes(b"\xaa" * MiB)
    (scratch / "b.raw").write_bytes(b"\xbb" * MiB)
    p = make_qed(scratch / "t.qed", MiB, backing="a.raw", backing_fmt="raw")
    assert run_cli("rebase", "-u", "-b", "b.raw", "-F", "raw", p).rc == 0
    with vblock.open_image(str(p), read_only=True) as img:
        assert img.info()["backing-filename"] == "b.raw"
        assert img.read(0, 2) == b"\xbb\xbb"
    one_error_line(run_cli("rebase", "-b", "a.raw", p), "-u")
    one_error_line(run_cli("rebase", "-u", "-b", "gone.raw", "-F", "raw", p), "gone.raw")
    assert run_cli("rebase", "-u", "-b", "", p).rc == 0
    with vblock.open_image(str(p), read_only=True) as img:
        assert "backing-filename" not in img.info() and img.read(0, 2) == b"\0\0"


# -- compare ----------------------------------------------------------------------------------------
def test_compare_identical_different_and_sizes(scratch):
    a = make_qed(scratch / "a.qed", 4 * MiB, writes=[(MiB, b"\x42" * 8192)])
    b = scratch / "b.raw"
    data = bytearray(4 * MiB)
    data[MiB : MiB + 8192] = b"\x42" * 8192
    b.write_bytes(bytes(data))
    r = run_cli("compare", "-F", "raw", a, b)
    assert (r.rc, r.out) == (0, "Images are identical.\n")
    data[MiB + 5000] = 0
    b.write_bytes(bytes(data))
    r = run_cli("compare", "-F", "raw", a, b)
    assert (r.rc, r.out) == (1, f"Content mismatch at offset {MiB + 5000}!\n")
    data[MiB + 5000] = 0x42
    b.write_bytes(bytes(data) + bytes(MiB))  # one more MiB of zeros
    assert run_cli("compare", "-F", "raw", a, b).rc == 0
    assert run_cli("compare", "-s", "-F", "raw", a, b).rc == 1
    r = run_cli("compare", a, scratch / "nope")  # qemu-img compare's code for an open error
    assert r.rc == 2 and len(r.err_lines) == 1 and "nope" in r.err and "Traceback" not in r.err


# -- convert ----------------------------------------------------------------------------------------
def _raw_with_data(path, size=8 * MiB):
    data = bytearray(size)
    data[0:4096] = b"\x01" * 4096
    data[3 * MiB : 3 * MiB + 200000] = os.urandom(200000)
    data[7 * MiB + 512 : 7 * MiB + 1024] = b"\x09" * 512
    with open(path, "wb") as f:
        f.truncate(size)
        for lo, hi in ((0, 4096), (3 * MiB, 3 * MiB + 200000), (7 * MiB, 7 * MiB + 4096)):
            f.seek(lo)
            f.write(data[lo:hi])
    return bytes(data)


def test_convert_raw_to_qed_and_back_is_sparse_and_exact(scratch):
    src = scratch / "src.raw"
    data = _raw_with_data(src)
    r = run_cli("convert", "-f", "raw", "-O", "qed", src, scratch / "d.qed")
    assert r.rc == 0, r.err
    with vblock.open_image(str(scratch / "d.qed"), read_only=True) as img:
        assert img.read(0, img.size) == data
        assert img.check()["allocated-clusters"] == 6  # 1 + 4 (200000 bytes over 4 clusters) + 1
    r = run_cli("convert", "-O", "raw", scratch / "d.qed", scratch / "back.raw")
    assert r.rc == 0, r.err
    assert (scratch / "back.raw").read_bytes() == data
    assert (scratch / "back.raw").stat().st_blocks * 512 < 2 * MiB  # holes stayed holes


def test_convert_skips_zero_clusters_inside_data(scratch):
    src = scratch / "z.raw"
    with open(src, "wb") as f:  # 4 MiB written, all zeros except one cluster
        f.write(bytes(2 * MiB) + b"\x05" * CS + bytes(2 * MiB - CS))
    assert run_cli("convert", "-f", "raw", "-O", "qed", src, scratch / "z.qed").rc == 0
    with vblock.open_image(str(scratch / "z.qed"), read_only=True) as img:
        assert img.check()["allocated-clusters"] == 1


@pytest.mark.parametrize("src_cache, mapped", [("writeback", True), ("none", False)])
def test_convert_writes_a_raw_source_from_its_mapping_unless_read_direct(
    scratch, monkeypatch, src_cache, mapped
):
    """A raw source read through the page cache is mapped, and the writes take views of the
    mapping (no read copy); with -T none it is read into buffers. Both skip zero clusters."""
    from vblock.block.image import Image
    from vblock.cli import convert as conv

    reads = []
    real = Image.submit_read
    monkeypatch.setattr(
        Image, "submit_read", lambda self, *a: (reads.append(a[0]), real(self, *a))[1]
    )
    src = scratch / "m.raw"
    data = os.urandom(3 * MiB) + bytes(2 * CS) + os.urandom(CS + 512)
    src.write_bytes(data)
    stats = conv.convert(str(src), str(scratch / "m.qed"), "qed", fmt="raw", src_cache=src_cache)
    assert (reads == []) is mapped
    assert stats["zero-skipped"] == 2 * CS and stats["copied"] == len(data) - 2 * CS
    with vblock.open_image(str(scratch / "m.qed"), read_only=True) as img:
        assert img.read(0, len(data)) == data
        assert img.check()["allocated-clusters"] == -(-len(data) // CS) - 2


def test_convert_fails_cleanly_when_the_mapped_source_shrinks(scratch, monkeypatch):
    """A source that shrinks under its mapping surfaces as EFAULT from the zero scan (see
    hostio.mapping): the conversion fails with it and leaves neither DST nor a temporary file."""
    import errno

    from vblock.block import convert as engine
    from vblock.cli import convert as conv

    calls = []
    real = engine.zero_granules

    def shrunk(view, granule):
        calls.append(len(view))
        if len(calls) == 2:
            raise OSError(errno.EFAULT, "Bad address (scanning for zeros: did the file shrink?)")
        return real(view, granule)

    monkeypatch.setattr(engine, "zero_granules", shrunk)
    src = scratch / "f.raw"
    src.write_bytes(os.urandom(8 * MiB))
    with pytest.raises(OSError) as e:
        conv.convert(str(src), str(scratch / "f.qed"), "qed", fmt="raw", depth=2)
    assert e.value.errno == errno.EFAULT and len(calls) >= 2
    assert sorted(os.listdir(scratch)) == ["f.raw"]


def test_convert_flattens_or_keeps_the_backing_file(scratch):
    base = scratch / "base.raw"
    base.write_bytes(b"\xbb" * (2 * MiB))
    top = make_qed(
        scratch / "top.qed",
        2 * MiB,
        writes=[(CS, b"\x77" * CS)],
        backing="base.raw",
        backing_fmt="raw",
    )
    with vblock.open_image(str(top), read_only=True) as img:
        expect = img.read(0, img.size)
    assert run_cli("convert", "-O", "qed", top, scratch / "flat.qed").rc == 0
    with vblock.open_image(str(scratch / "flat.qed"), read_only=True) as img:
        assert img.backing is None and img.read(0, img.size) == expect
    assert (
        run_cli("convert", "-O", "qed", "-B", "base.raw", "-F", "raw", top, scratch / "thin.qed").rc
        == 0
    )
    with vblock.open_image(str(scratch / "thin.qed"), read_only=True) as img:
        assert img.info()["backing-filename"] == "base.raw"
        assert img.read(0, img.size) == expect
        assert img.check()["allocated-clusters"] == 1


def test_convert_failure_leaves_no_destination(scratch):
    src = make_qed(scratch / "s.qed", MiB, writes=[(0, b"\x01" * CS)])
    with open(src, "r+b") as f:
        f.seek(_l2_entry_offset(src, 0, 0))
        f.write(struct.pack("<Q", 12345))  # misaligned data offset: reading it fails
    r = run_cli("convert", "-O", "raw", src, scratch / "out.raw")
    one_error_line(r)
    assert sorted(os.listdir(scratch)) == ["s.qed"]


@pytest.mark.parametrize("cache, starts", [("writeback", 4), ("unsafe", 0), ("none", 0)])
def test_convert_writes_back_as_it_copies_only_when_it_will_flush(
    scratch, monkeypatch, cache, starts
):
    """-t writeback starts the destination's writeback every WRITE_BEHIND bytes copied, so the
    final flush finds little left; unsafe never flushes and none bypasses the page cache."""
    from vblock.block import convert as engine
    from vblock.block.image import Image
    from vblock.cli import convert as conv

    monkeypatch.setattr(engine, "WRITE_BEHIND", 2 * MiB)
    calls = []
    real = Image.start_writeback
    monkeypatch.setattr(
        Image, "start_writeback", lambda self: (calls.append(self.path), real(self))[1]
    )
    src = scratch / "w.raw"
    data = os.urandom(8 * MiB + CS)
    src.write_bytes(data)
    conv.convert(str(src), str(scratch / "w.qed"), "qed", fmt="raw", cache=cache)
    assert len(calls) == starts
    with vblock.open_image(str(scratch / "w.qed"), read_only=True) as img:
        assert img.read(0, len(data)) == data


def test_convert_flushes_only_when_asked_as_qemu_img_does(scratch, monkeypatch):
    """The default destination cache mode is qemu-img convert's, unsafe: no flush at all; -t
    writeback flushes the new image before the rename."""
    from vblock.block.image import Image
    from vblock.cli.main import build_parser

    calls = []
    real = Image.flush
    monkeypatch.setattr(Image, "flush", lambda self: (calls.append(self.path), real(self))[1])
    src = scratch / "f.raw"
    src.write_bytes(os.urandom(CS))
    assert build_parser().parse_args(["convert", "-O", "qed", "a", "b"]).cache == "unsafe"
    assert run_cli("convert", "-O", "qed", src, scratch / "u.qed").rc == 0
    from vblock.cli import convert as conv

    conv.convert(str(src), str(scratch / "d.qed"), "qed", fmt="raw")
    assert calls == []
    conv.convert(str(src), str(scratch / "w.qed"), "qed", fmt="raw", cache="writeback")
    assert len(calls) == 1 and ".w.qed" in calls[0]  # the temporary name, before the rename


def test_convert_bad_inputs(scratch):
    one_error_line(
        run_cli("convert", "-O", "qed", scratch / "none.raw", scratch / "o.qed"), "none.raw"
    )
    (scratch / "s.raw").write_bytes(bytes(MiB))
    one_error_line(
        run_cli("convert", "-O", "vhdx", scratch / "s.raw", scratch / "o"), "unknown format 'vhdx'"
    )
    one_error_line(
        run_cli("convert", "-f", "raw", "-O", "qed", scratch / "s.raw", scratch / "s.raw"),
        "is the source",
    )
    assert sorted(os.listdir(scratch)) == ["s.raw"]


def test_convert_an_odd_sized_raw_file_rounds_qed_up_to_a_sector(scratch):
    (scratch / "odd.raw").write_bytes(b"abc")
    assert (
        run_cli("convert", "-f", "raw", "-O", "qed", scratch / "odd.raw", scratch / "odd.qed").rc
        == 0
    )
    with vblock.open_image(str(scratch / "odd.qed"), read_only=True) as img:
        assert img.size == 512 and img.read(0, 512) == b"abc" + bytes(509)
    assert run_cli("compare", "-f", "raw", scratch / "odd.raw", scratch / "odd.qed").rc == 0

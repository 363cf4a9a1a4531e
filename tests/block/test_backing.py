"""Backing chains are opened by the block layer: the drivers' opener, loops, missing backing
files (BackingFileError naming both files), and no_backing (QEMU's BDRV_O_NO_BACKING)."""

from __future__ import annotations

import ast
import errno
import pathlib

import pytest

import vblock
import vblock.drivers
from tests.files import digest
from vblock.block.backing import backing_path
from vblock.block.interface import OpenOptions
from vblock.errors import BackingFileError, ImageError, ReadOnlyError

MiB = 1 << 20
CS = 64 << 10


def _qed(path, backing=None, backing_fmt=None, writes=()):
    opts = {"backing_file": backing, "backing_fmt": backing_fmt} if backing else {}
    with vblock.create_image(str(path), "qed", MiB, **opts) as img:
        for off, data in writes:
            img.write(off, data)
    return path


def _orphan(scratch):
    """top.qed over base.raw, with data in its first cluster; base.raw then removed."""
    (scratch / "base.raw").write_bytes(b"\x05" * MiB)
    top = _qed(scratch / "top.qed", "base.raw", "raw", writes=[(0, b"\x07" * CS)])
    (scratch / "base.raw").unlink()
    return top


def test_missing_backing_file_is_a_backing_file_error_naming_both_files(scratch):
    top = _orphan(scratch)
    with pytest.raises(BackingFileError) as info:
        vblock.open_image(top, read_only=True)
    e = info.value
    assert isinstance(e, OSError) and isinstance(e, ImageError)
    assert e.errno == errno.ENOENT and e.field == "backing_file"
    assert e.path == str(top) and e.backing == "base.raw" and e.filename == str(top)
    assert str(e) == f"{top}: cannot open backing file base.raw: No such file or directory"


def test_missing_backing_file_deeper_in_the_chain_names_its_own_parent(scratch):
    (scratch / "base.raw").write_bytes(bytes(MiB))
    _qed(scratch / "mid.qed", "base.raw", "raw")
    top = _qed(scratch / "top.qed", "mid.qed", "qed")
    (scratch / "base.raw").unlink()
    with pytest.raises(BackingFileError) as info:
        vblock.open_image(top, read_only=True)
    assert info.value.path == str(scratch / "mid.qed") and info.value.backing == "base.raw"


def test_no_backing_opens_an_orphan_alone_and_keeps_the_backing_name(scratch):
    top = _orphan(scratch)
    with vblock.open_image(top, read_only=True, no_backing=True) as img:
        assert img.backing is None
        info = img.driver.info()
        assert info["backing-filename"] == "base.raw"
        assert info["full-backing-filename"] == str(scratch / "base.raw")
        assert img.read(0, CS) == b"\x07" * CS  # this image's data
        assert img.read(CS, CS) == bytes(CS)  # the backing file's part reads as zeros
        assert [r.kind for r in img.driver.block_status(0, 2 * CS)] == ["data", "unallocated"]


def test_no_backing_read_write_refuses_data_writes_and_changes_nothing(scratch):
    top = _orphan(scratch)
    before = digest(top)
    with vblock.open_image(top, no_backing=True) as img:
        for op in (
            lambda: img.write(CS, b"\1" * 4096),
            lambda: img.write_zeroes(0, CS),
            lambda: img.discard(0, CS),
        ):
            with pytest.raises(ReadOnlyError, match="without its backing chain"):
                op()
    assert digest(top) == before


def test_no_backing_read_write_still_changes_the_backing_name(scratch):
    top = _orphan(scratch)
    (scratch / "new.raw").write_bytes(b"\x05" * MiB)
    with vblock.open_image(top, no_backing=True) as img:
        img.change_backing("new.raw", "raw")
        assert img.backing is None  # the new backing file is not opened either
    with vblock.open_image(top, read_only=True) as img:
        assert img.backing.path == str(scratch / "new.raw")
        assert img.read(CS, 16) == b"\x05" * 16


def test_drivers_get_the_backing_file_through_the_opener_in_open_options(scratch):
    (scratch / "base.raw").write_bytes(bytes(MiB))
    top = _qed(scratch / "top.qed", "base.raw", "raw")
    calls = []

    def opener(parent, name, fmt, options):
        calls.append((parent, name, fmt, options.read_only))
        return vblock.open_image(
            backing_path(parent, name), format=fmt, read_only=True, cache="writeback"
        )

    cls = vblock.block.get_driver("qed")
    drv = cls.open(str(top), OpenOptions(read_only=True, cache="writeback", backing_opener=opener))
    try:
        assert calls == [(str(top), "base.raw", "raw", True)]
        assert drv.backing.path == str(scratch / "base.raw")
    finally:
        drv.close()


def test_a_loop_through_three_images_is_an_image_error(scratch):
    from vblock.drivers.qed import format as fmt

    # hand-made headers: create_image opens what it creates, and this chain cannot be opened
    for name, nxt in (("a.qed", "b.qed"), ("b.qed", "c.qed"), ("c.qed", "a.qed")):
        _h, head = fmt.create_header(MiB, 4096, 2, nxt, "qed")
        (scratch / name).write_bytes(head.ljust(4096 * 3, b"\0"))
    with pytest.raises(ImageError) as info:
        vblock.open_image(scratch / "a.qed", read_only=True)
    assert info.value.field == "backing_file" and "loop" in str(info.value)
    assert info.value.path == str(scratch / "c.qed")  # the image that points back


def test_no_driver_imports_the_top_level_package():
    """Drivers sit below vblock.block: they import the block layer's modules, never ``vblock``
    itself (whose front door would open their backing files for them)."""
    root = pathlib.Path(vblock.drivers.__file__).parent
    offenders = []
    for src in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(src.read_text(), str(src))):
            if isinstance(node, ast.Import) and any(a.name == "vblock" for a in node.names):
                offenders.append(f"{src.relative_to(root)}:{node.lineno}")
            elif isinstance(node, ast.ImportFrom) and node.module == "vblock" and node.level == 0:
                offenders.append(f"{src.relative_to(root)}:{node.lineno}")
    assert offenders == []

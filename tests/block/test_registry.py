"""Driver registry: built-ins, entry-point plug-ins, probing and the raw-safety rule."""

import logging
import os
import struct
import textwrap

import pytest

import vblock
import vblock.drivers
from vblock.block import registry
from vblock.block.interface import BlockDriver
from vblock.drivers.memory.driver import MemoryDriver

QED_MAGIC = 0x00444551


@pytest.fixture
def fresh_registry():
    registry.refresh()
    saved = dict(registry._added)
    yield registry
    registry._added.clear()
    registry._added.update(saved)
    registry.refresh()


def test_builtins_are_available():
    names = vblock.drivers.available()
    assert {"raw", "null", "memory"} <= set(names)
    assert names == sorted(names)
    assert registry.get_driver("raw").format_name == "raw"


def test_every_builtin_package_exposes_driver():
    import importlib
    import pkgutil

    for mod in pkgutil.iter_modules(vblock.drivers.__path__):
        if mod.name in ("raw", "null", "memory"):
            module = importlib.import_module(f"vblock.drivers.{mod.name}")
            assert issubclass(module.DRIVER, BlockDriver)
            assert module.DRIVER.format_name == mod.name


def _qed_header(backing_name: bytes) -> bytes:
    """A plausible QED header (cluster 64 KiB, L1 at 64 KiB, 1 GiB) naming a backing file."""
    head = struct.pack(
        "<IIIIQQQQQII",
        QED_MAGIC,
        65536,
        4,
        1,
        0x01,  # F_BACKING_FILE
        0,
        0,
        65536,
        1 << 30,
        64,
        len(backing_name),
    )
    return head + backing_name


def test_raw_disk_with_a_qed_header_stays_raw(scratch):
    secret = os.path.join(scratch, "host-secret")
    with open(secret, "wb") as f:
        f.write(b"SECRET" * 1000)
    path = os.path.join(scratch, "guest.raw")
    header = _qed_header(secret.encode())
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(1 << 20)
    with vblock.open_image(path, format="raw") as img:
        assert img.format == "raw"
        assert img.size == 1 << 20  # not the 1 GiB the header claims
        assert img.backing is None
        assert img.read(0, len(header)) == header
        assert b"SECRET" not in img.read(0, 1 << 20)
        img.write(70000, b"guest data")
    with open(path, "rb") as f:
        f.seek(70000)
        assert f.read(10) == b"guest data"  # writes land at the same offsets
        f.seek(0)
        assert f.read(len(header)) == header


def test_probe_picks_the_driver_with_the_magic(scratch, fresh_registry):
    class Magic(MemoryDriver):
        format_name = "magic"

        @classmethod
        def probe(cls, head, path):
            return 100 if head.startswith(b"MAGICIMG") else 0

    fresh_registry.register("magic", Magic)
    path = os.path.join(scratch, "m.img")
    with open(path, "wb") as f:
        f.write(b"MAGICIMG" + bytes(100))
    assert fresh_registry.probe_format(path) == "magic"


def test_probe_without_magic_opens_raw_with_a_warning(scratch, caplog):
    path = os.path.join(scratch, "plain.img")
    with open(path, "wb") as f:
        f.write(b"\x00" * 8192)
    with caplog.at_level(logging.WARNING, logger="vblock.block.registry"):
        with vblock.open_image(path) as img:
            assert img.format == "raw"
    assert any("format='raw'" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vblock.block.registry"):
        with vblock.open_image(path, format="raw") as img:
            assert img.format == "raw"
    assert not caplog.records


def test_probe_of_a_qed_header_chooses_qed_when_the_driver_is_there(scratch):
    if "qed" not in vblock.drivers.available():
        pytest.skip("the qed driver is not installed")
    path = os.path.join(scratch, "q.img")
    with open(path, "wb") as f:
        f.write(_qed_header(b""))
    assert registry.probe_format(path) == "qed"


def test_open_without_path_or_format_is_an_error():
    from vblock.errors import UnknownFormatError

    with pytest.raises(UnknownFormatError):
        vblock.open_image(None)


def test_entry_point_plugin_is_found_and_opens(tmp_path, monkeypatch, fresh_registry):
    pkg = tmp_path / "vblock_fakedisk"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        textwrap.dedent(
            """
            from vblock.drivers.memory.driver import MemoryDriver

            class FakeDisk(MemoryDriver):
                format_name = "fakedisk"

                def info(self):
                    return {"plugin": True}
            """
        )
    )
    dist = tmp_path / "vblock_fakedisk-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vblock-fakedisk\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[vblock.drivers]\nfakedisk = vblock_fakedisk:FakeDisk\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_registry.refresh()

    assert "fakedisk" in vblock.drivers.available()
    with vblock.open_image(None, format="fakedisk", size=8192) as img:
        assert img.format == "fakedisk"
        img.write(10, b"plugged in")
        assert img.read(10, 10) == b"plugged in"
        assert img.info()["plugin"] is True


def test_broken_entry_point_is_an_unknown_format(tmp_path, monkeypatch, fresh_registry):
    dist = tmp_path / "vblock_broken-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vblock-broken\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vblock.drivers]\nbroken = no_such_module_xyz:Driver\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_registry.refresh()
    assert "broken" in vblock.drivers.available()
    from vblock.errors import UnknownFormatError

    with pytest.raises(UnknownFormatError, match="broken"):
        vblock.open_image(None, format="broken", size=10)


def test_entry_point_cannot_shadow_a_builtin(tmp_path, monkeypatch, fresh_registry):
    dist = tmp_path / "vblock_shadow-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vblock-shadow\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[vblock.drivers]\nraw = no_such_module_xyz:Driver\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_registry.refresh()
    from vblock.drivers.raw import RawDriver

    assert fresh_registry.get_driver("raw") is RawDriver


# -- reading entry points without importlib.metadata --------------------------------------------------
def _dist(where, dirname, entry_points):
    d = where / dirname
    d.mkdir(parents=True)
    name = dirname.split("-")[0].split(".")[0]
    (d / ("METADATA" if dirname.endswith(".dist-info") else "PKG-INFO")).write_text(
        f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    )
    if entry_points is not None:
        (d / "entry_points.txt").write_text(entry_points)


def test_the_path_scan_finds_what_importlib_metadata_finds(tmp_path, monkeypatch):
    """Sections, comments, extras, an .egg-info, a distribution without entry points, and a second
    copy of a distribution later on the path (hidden by the first, as importlib.metadata hides it)."""
    from importlib import metadata

    first, second = tmp_path / "first", tmp_path / "second"
    _dist(
        first,
        "vblock_one-1.0.dist-info",
        "# a comment\n[console_scripts]\none = x:y\n\n[vblock.drivers]\none = pkg_one.mod:Driver\n"
        "# another comment\ntwo = pkg_two:Outer.Inner [extra]\n",
    )
    _dist(first, "Vblock.Three-2.0.dist-info", "[vblock.drivers]\nthree=pkg_three:D\n")
    _dist(first, "vblock_egg.egg-info", "[vblock.drivers]\negg = pkg_egg:D\n")
    _dist(first, "vblock_none-1.0.dist-info", None)
    _dist(second, "vblock_three-3.0.dist-info", "[vblock.drivers]\nshadowed = pkg_shadow:D\n")
    monkeypatch.syspath_prepend(str(second))
    monkeypatch.syspath_prepend(str(first))
    ours = sorted((ep.name, ep.value) for ep in registry._path_entry_points())
    theirs = sorted(
        (ep.name, ep.value) for ep in metadata.entry_points(group=registry.ENTRY_POINT_GROUP)
    )
    assert ours == theirs
    assert ("one", "pkg_one.mod:Driver") in ours and ("egg", "pkg_egg:D") in ours
    assert "shadowed" not in dict(ours)


def test_an_entry_point_from_the_path_scan_loads_dotted_attributes(tmp_path, monkeypatch):
    (tmp_path / "pkg_dotted.py").write_text("class Outer:\n    class Inner:\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import pkg_dotted

    assert (
        registry._EntryPoint("x", "pkg_dotted:Outer.Inner [extra]").load() is pkg_dotted.Outer.Inner
    )
    assert registry._EntryPoint("x", "pkg_dotted").load() is pkg_dotted
    assert registry._EntryPoint("x", "pkg_dotted [extra]").load() is pkg_dotted


def test_a_zip_on_the_path_leaves_the_scan_to_importlib_metadata(
    tmp_path, monkeypatch, fresh_registry
):
    import zipfile

    archive = tmp_path / "plugins.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr(
            "vblock_zipped-1.0.dist-info/METADATA",
            "Metadata-Version: 2.1\nName: vblock-zipped\nVersion: 1.0\n",
        )
        z.writestr(
            "vblock_zipped-1.0.dist-info/entry_points.txt", "[vblock.drivers]\nzipped = nowhere:D\n"
        )
    monkeypatch.syspath_prepend(str(archive))
    assert registry._path_entry_points() is None
    fresh_registry.refresh()
    assert "zipped" in vblock.drivers.available()


@pytest.mark.parametrize("case", ["undecodable", "malformed", "egg"])
def test_what_the_scan_cannot_read_as_importlib_metadata_does_goes_to_it(
    tmp_path, monkeypatch, fresh_registry, caplog, case
):
    """A file that is not UTF-8 or holds a line that is not ``name = value`` (importlib.metadata
    refuses both: a warning, no plug-ins, as before the scan), and an ``.egg`` directory on the
    path (whose EGG-INFO only it reads: its plug-in is found)."""
    if case == "egg":
        egg = tmp_path / "vblock_egged-1.0-py3.11.egg"
        (egg / "EGG-INFO").mkdir(parents=True)
        (egg / "EGG-INFO" / "PKG-INFO").write_text(
            "Metadata-Version: 2.1\nName: vblock-egged\nVersion: 1.0\n"
        )
        (egg / "EGG-INFO" / "entry_points.txt").write_text("[vblock.drivers]\negged = nowhere:D\n")
        monkeypatch.syspath_prepend(str(egg))
    else:
        text = (
            b"[vblock.drivers]\nbad = \xff\xfe:D\n"
            if case == "undecodable"
            else b"[other]\nno equals sign\n"
        )
        _dist(tmp_path, "vblock_bad-1.0.dist-info", None)
        (tmp_path / "vblock_bad-1.0.dist-info" / "entry_points.txt").write_bytes(text)
        monkeypatch.syspath_prepend(str(tmp_path))
    assert registry._path_entry_points() is None
    fresh_registry.refresh()
    with caplog.at_level(logging.WARNING, logger="vblock.block.registry"):
        names = vblock.drivers.available()
    if case == "egg":
        assert "egged" in names
    else:
        assert "could not read vblock.drivers entry points" in caplog.text
        assert "raw" in names and "qed" in names  # the built-ins stay


def test_probing_a_raw_file_does_not_import_importlib_metadata(tmp_path):
    """What the scan is for: a command that probes a raw file starts about 25 ms sooner."""
    import subprocess
    import sys

    raw = tmp_path / "disk.raw"
    raw.write_bytes(b"\x5a" * 4096)
    code = (
        f"import sys, vblock.block.registry as r; assert r.probe_format({str(raw)!r}) == 'raw';"
        "print('importlib.metadata' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "False"

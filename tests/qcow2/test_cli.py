"""The command line on hand-made qcow2 images (no qemu-img): info, map, check and convert, and
``convert --in-place``'s arguments, refusals and progress display."""

from __future__ import annotations

import io
import json

import vblock
from tests.files import digest
from vblock.cli.main import main
from vblock.cli.output import Environment
from vblock.testing.qcow2_image import ZERO, build

KiB = 1 << 10
MiB = 1 << 20
CS = 64 * KiB


def _cli(*argv, tty=False):
    out, err = io.StringIO(), io.StringIO()
    rc = main(
        [str(a) for a in argv],
        Environment(stdout=out, stderr=err, stdout_isatty=False, stderr_isatty=tty),
    )
    return int(rc), out.getvalue(), err.getvalue()


def _image(scratch, **kw):
    path = scratch / "d.qcow2"
    clusters = {0: b"\x11" * CS, 1: ("compressed", b"\x22" * CS), 2: ZERO, 5: b"\x33" * CS}
    path.write_bytes(build(MiB, clusters, **kw).data)
    return path


def test_info_json_shows_format_specific_data(scratch):
    rc, out, _ = _cli("info", "--output=json", _image(scratch, lazy_refcounts=True))
    info = json.loads(out)
    assert rc == 0 and info["format"] == "qcow2" and info["cluster-size"] == CS
    assert info["format-specific"] == {
        "type": "qcow2",
        "data": {
            "compat": "1.1",
            "compression-type": "zlib",
            "lazy-refcounts": True,
            "refcount-bits": 16,
            "corrupt": False,
            "extended-l2": False,
        },
    }


def test_map_json_gives_compressed_data_no_offset(scratch):
    rc, out, _ = _cli("map", "--output=json", _image(scratch))
    entries = json.loads(out)
    assert rc == 0
    assert [(e["start"], e["length"], e["data"], e["zero"], "offset" in e) for e in entries] == [
        (0, CS, True, False, True),
        (CS, CS, True, False, False),
        (2 * CS, CS, False, True, False),
        (3 * CS, 2 * CS, False, True, False),
        (5 * CS, CS, True, False, True),
        (6 * CS, MiB - 6 * CS, False, True, False),
    ]


def test_check_json_counts_compressed_clusters(scratch):
    path = _image(scratch)
    before = digest(path)
    rc, out, _ = _cli("check", "--output=json", path)
    result = json.loads(out)
    assert rc == 0 and result["compressed-clusters"] == 1 and result["allocated-clusters"] == 3
    assert "leaks" not in result and "corruptions" not in result
    assert digest(path) == before


def test_convert_to_raw_is_byte_exact(scratch):
    path = _image(scratch)
    rc, _, err = _cli("convert", "-O", "raw", path, scratch / "out.raw")
    assert rc == 0, err
    with vblock.open_image(str(path), read_only=True) as img:
        assert (scratch / "out.raw").read_bytes() == img.read(0, img.size)


def test_in_place_only_converts_to_qed(scratch):
    path = _image(scratch)
    before = digest(path)
    rc, _, err = _cli("convert", "--in-place", "-O", "raw", path)
    assert rc == 1 and err == "vblock: error: vblock convert --in-place: only -O qed is supported\n"
    assert digest(path) == before


def test_in_place_takes_one_image(scratch):
    path = _image(scratch)
    rc, _, err = _cli("convert", "--in-place", "-O", "qed", path, scratch / "other.qed")
    assert rc == 1 and err == "vblock: error: vblock convert --in-place takes exactly one IMAGE\n"


def test_in_place_refuses_an_image_another_open_holds(scratch):
    path = _image(scratch)
    before = digest(path)
    with vblock.open_image(str(path), read_only=True):
        rc, _, err = _cli("convert", "--in-place", "-O", "qed", path)
    assert rc == 1 and err.startswith("vblock: error: ") and len(err.splitlines()) == 1
    assert "lock" in err
    assert digest(path) == before


def test_in_place_reports_what_it_wrote(scratch):
    path = _image(scratch)
    rc, _, err = _cli("convert", "--in-place", "-O", "qed", path)
    assert rc == 0
    assert (
        err.startswith(f"{path}: converted to QED in place; ") and "1 clusters written out" in err
    )
    with vblock.open_image(str(path), read_only=True) as img:
        assert img.format == "qed"


def test_in_place_draws_progress_on_a_terminal(scratch):
    path = _image(scratch)
    rc, _, err = _cli("convert", "--in-place", "-O", "qed", path, tty=True)
    assert rc == 0
    assert f"converting {path} in place" in err

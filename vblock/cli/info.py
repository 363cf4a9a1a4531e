"""``vblock info [--output=json] [--backing-chain] [-f FMT] FILE``

What ``qemu-img info`` says about an image, with the same JSON keys: format, virtual size, disk
size, cluster size, backing file (name, format, resolved path) and the dirty flag as the header
bytes have it (the image is opened read-only, so nothing is repaired or cleared first). Only
``--backing-chain`` opens the backing files: without it an image whose backing file is missing is
shown all the same.
"""

from __future__ import annotations

import os
import time

from vblock.cli import _images
from vblock.cli.output import dump_json, human_size
from vblock.cli.status import ExitStatus
from vblock.nbd.uri import is_nbd_uri

_QED_DIRTY_BYTE = 16  # features (u64 LE) at offset 16; QED_F_NEED_CHECK = 0x02
_QED_F_NEED_CHECK = 0x02


def add_parser(sub, common):
    p = sub.add_parser(
        "info",
        parents=[common],
        help="show what an image is",
        description=__doc__.split("\n\n")[0].strip("`"),
    )
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (default: probe)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    p.add_argument("--backing-chain", action="store_true", help="also describe every backing file")
    _images.add_force_share(p)
    p.add_argument("file", metavar="FILE")


def _dirty_from_header(path) -> bool:
    with open(path, "rb") as f:
        f.seek(_QED_DIRTY_BYTE)
        return bool(int.from_bytes(f.read(8), "little") & _QED_F_NEED_CHECK)


def describe(img, filename) -> dict:
    """qemu-img info's JSON object for one open image (keys as qemu-img 7.2 prints them)."""
    raw = img.info()
    d = {"virtual-size": img.size, "filename": filename, "format": img.format}
    if "cluster-size" in raw:
        d["cluster-size"] = raw["cluster-size"]
    if raw.get("actual-size") is not None:
        d["actual-size"] = raw["actual-size"]
    elif img.path and not is_nbd_uri(img.path):
        d["actual-size"] = os.stat(img.path).st_blocks * 512
    if "backing-filename" in raw:
        d["backing-filename"] = raw["backing-filename"]
        if raw.get("full-backing-filename"):
            d["full-backing-filename"] = raw["full-backing-filename"]
        if raw.get("backing-filename-format"):
            d["backing-filename-format"] = raw["backing-filename-format"]
    if "snapshots" in raw:
        d["snapshots"] = raw["snapshots"]
    if "format-specific" in raw:
        d["format-specific"] = raw["format-specific"]
    d["dirty-flag"] = (
        _dirty_from_header(img.path) if img.format == "qed" else bool(raw.get("dirty-flag", False))
    )
    return d


def _chain(img, filename):
    out = [describe(img, filename)]
    b = img.backing
    while b is not None:
        out.append(describe(b, b.path))
        b = b.backing
    return out


def _human(d, table_size=None) -> str:
    lines = [
        f"image: {d['filename']}",
        f"file format: {d['format']}",
        f"virtual size: {human_size(d['virtual-size'])} ({d['virtual-size']} bytes)",
        f"disk size: {human_size(d.get('actual-size'))}",
    ]
    if "cluster-size" in d:
        lines.append(f"cluster_size: {d['cluster-size']}")
    if table_size is not None:
        lines.append(f"table_size: {table_size}")
    if "backing-filename" in d:
        full = d.get("full-backing-filename")
        name = d["backing-filename"]
        lines.append(
            f"backing file: {name}" + (f" (actual path: {full})" if full and full != name else "")
        )
        if "backing-filename-format" in d:
            lines.append(f"backing file format: {d['backing-filename-format']}")
    if d.get("snapshots"):
        lines.append("Snapshot list:")
        lines.append(f"{'ID':<8}{'TAG':<24}{'VM SIZE':>8}{'DATE':>21}{'VM CLOCK':>16}")
        for sn in d["snapshots"]:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(sn["date-sec"]))
            secs = sn["vm-clock-sec"]
            clock = f"{secs // 3600:04d}:{secs // 60 % 60:02d}:{secs % 60:02d}.{sn['vm-clock-nsec'] // 1000000:03d}"
            lines.append(
                f"{sn['id']:<8}{sn['name']:<24}{human_size(sn['vm-state-size']):>8}"
                f"{when:>21}{clock:>16}"
            )
    if d["format"] == "qed":
        lines.append(f"dirty flag: {'yes' if d['dirty-flag'] else 'no'}")
    spec = d.get("format-specific")
    if spec:
        lines.append("Format specific information:")
        for key, value in spec["data"].items():
            shown = str(value).lower() if isinstance(value, bool) else value
            lines.append(f"    {key.replace('-', ' ')}: {shown}")
    return "\n".join(lines)


def run(args, env):
    # The backing chain is opened only to describe it: without --backing-chain an image whose
    # backing file is missing is still shown, with the backing file's name.
    with _images.open_image(
        args.file, args.fmt, no_backing=not args.backing_chain, force_share=args.force_share
    ) as img:
        chain = _chain(img, args.file)
        tables = []
        layer = img
        while layer is not None:
            tables.append(layer.info().get("table-size"))
            layer = layer.backing
    if args.output == "json":
        env.out(dump_json(chain if args.backing_chain else chain[0]))
    else:
        shown = chain if args.backing_chain else chain[:1]
        env.out("\n\n".join(_human(d, t) for d, t in zip(shown, tables)))
    return ExitStatus.SUCCESS

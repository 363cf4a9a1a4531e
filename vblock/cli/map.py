"""``vblock map [--output=json] [-f FMT] FILE``

Where the guest's bytes come from, as ``qemu-img map`` says it: runs with ``start``, ``length``,
``depth`` (0 = this image, 1 = its backing file ...), ``present`` (some layer allocates the run),
``zero``, ``data`` and, where the bytes have a place in a file, ``offset`` in that file. The human
form lists only the runs with data, with the file they live in. When a backing file cannot be
opened (missing), the map shows this image's own allocation and reports the rest unallocated,
after a warning that names both files.
"""

from __future__ import annotations

import errno
import os

from vblock.block.interface import DATA, UNALLOCATED, ZERO
from vblock.cli import _images
from vblock.cli.status import ExitStatus
from vblock.errors import BackingFileError

CHUNK = 1 << 30  # bytes asked of block_status at a time


def add_parser(sub, common):
    p = sub.add_parser(
        "map",
        parents=[common],
        help="show how an image's data is laid out",
        description=__doc__.split("\n\n")[0].strip("`"),
    )
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (default: probe)")
    p.add_argument("--output", choices=("human", "json"), default="human")
    _images.add_force_share(p)
    p.add_argument("file", metavar="FILE")


def _layer(img, start, length, depth):
    """Entries for [start, start+length) resolved down ``img``'s backing chain:
    dicts with qemu-img map's keys plus ``file``."""
    for run in img.driver.block_status(start, length):
        if run.kind == DATA:
            e = {
                "start": run.offset,
                "length": run.length,
                "depth": depth,
                "present": True,
                "zero": False,
                "data": True,
                "file": img.path,
            }
            if run.host_offset is None:  # compressed data has no place of its own
                yield e
            else:
                e["offset"] = run.host_offset
                if getattr(img.driver, "reports_host_holes", False):
                    yield from _split_holes(e)
                else:
                    yield e
        elif run.kind == ZERO:
            e = {
                "start": run.offset,
                "length": run.length,
                "depth": depth,
                "present": True,
                "zero": True,
                "data": False,
            }
            if img.format == "raw":  # a hole in a raw file still has its place in the file
                e["offset"] = run.offset
                e["file"] = img.path
            elif run.host_offset is not None:  # a zero cluster that keeps its host cluster
                e["offset"] = run.host_offset
                e["file"] = img.path
            yield e
        else:
            assert run.kind == UNALLOCATED
            backing = img.backing
            inside = 0
            if backing is not None:
                inside = max(0, min(run.offset + run.length, backing.size) - run.offset)
                if inside:
                    yield from _layer(backing, run.offset, inside, depth + 1)
            if inside < run.length:
                yield {
                    "start": run.offset + inside,
                    "length": run.length - inside,
                    "depth": depth,
                    "present": False,
                    "zero": True,
                    "data": False,
                }


def _split_holes(e):
    """``e`` (data at ``offset`` in a file) split where the file has holes: a hole reads as
    zeros, so QEMU's map reports those parts ``zero`` as well as ``data``. Past the end of the
    file nothing is split."""
    try:
        fd = os.open(e["file"], os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        yield e
        return
    try:
        end_of_file = os.fstat(fd).st_size
        pos, end = e["offset"], e["offset"] + e["length"]
        inside = min(end, end_of_file)
        while pos < inside:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = inside
            if data > pos:
                n = min(data, inside) - pos
                yield {
                    **e,
                    "start": e["start"] + pos - e["offset"],
                    "length": n,
                    "offset": pos,
                    "zero": True,
                }
                pos += n
                continue
            hole = min(os.lseek(fd, pos, os.SEEK_HOLE), inside)
            yield {
                **e,
                "start": e["start"] + pos - e["offset"],
                "length": hole - pos,
                "offset": pos,
            }
            pos = hole
        if pos < end:
            yield {**e, "start": e["start"] + pos - e["offset"], "length": end - pos, "offset": pos}
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        yield e  # no SEEK_DATA here: all data
    finally:
        os.close(fd)


def _mergeable(a, b) -> bool:
    if a["start"] + a["length"] != b["start"]:
        return False
    for k in ("depth", "present", "zero", "data", "file"):
        if a.get(k) != b.get(k):
            return False
    if ("offset" in a) != ("offset" in b):
        return False
    return "offset" not in a or a["offset"] + a["length"] == b["offset"]


def map_entries(img) -> list:
    out = []
    pos = 0
    while pos < img.size:
        n = min(CHUNK, img.size - pos)
        for e in _layer(img, pos, n, 0):
            if out and _mergeable(out[-1], e):
                out[-1]["length"] += e["length"]
            else:
                out.append(e)
        pos += n
    return out


_KEYS = ("start", "length", "depth", "present", "zero", "data", "offset")


def _json_entry(e) -> str:
    parts = []
    for k in _KEYS:
        if k in e:
            v = e[k]
            parts.append(f'"{k}": {str(v).lower() if isinstance(v, bool) else v}')
    return "{ " + ", ".join(parts) + "}"


def _hex(n) -> str:
    return f"{n:#x}" if n else "0"


def _open(args, env):
    """The image with its backing chain; when a backing file cannot be opened, the image alone
    (with a warning), so that the map shows this image's own allocation and the rest unallocated."""
    try:
        return _images.open_image(args.file, args.fmt, force_share=args.force_share)
    except BackingFileError as exc:
        env.warn(f"{exc}; showing {args.file}'s own allocation only")
        return _images.open_image(
            args.file, args.fmt, no_backing=True, force_share=args.force_share
        )


def run(args, env):
    with _open(args, env) as img:
        entries = map_entries(img)
    if args.output == "json":
        env.out("[" + ",\n".join(_json_entry(e) for e in entries) + "]")
    else:
        env.out(f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File")
        for e in entries:
            if e["data"] and "offset" in e:
                env.out(
                    f"{_hex(e['start']):<16}{_hex(e['length']):<16}{_hex(e['offset']):<16}{e['file']}"
                )
    return ExitStatus.SUCCESS

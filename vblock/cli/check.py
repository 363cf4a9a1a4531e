"""``vblock check [-r leaks|all] [--output=json] [-f FMT] FILE``

Checks an image's metadata as ``qemu-img check`` does, with its exit codes (``status.py``): 0 clean,
2 corruptions, 3 leaked clusters only, 1 the check could not be completed, 63 the format has no
metadata to check (raw). ``-r`` repairs (for QED: zeroes invalid table entries and reclaims leaked
clusters), then checks again and reports what remains. Without ``-r`` the image is opened
read-only and nothing is written to it. The backing chain is never opened (a check needs only
this image's metadata), so an image whose backing file is missing can be checked and repaired.
"""

from __future__ import annotations

from vblock.block.interface import BlockDriver
from vblock.cli import _images
from vblock.cli.output import UsageError, dump_json
from vblock.cli.progress import progress_for
from vblock.cli.status import ExitStatus, check_status
from vblock.errors import UnsupportedError

_ALWAYS = ("total-clusters", "check-errors", "filename", "format")
_WHEN_SET = (
    "image-end-offset",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
    "leaks",
    "corruptions",
    "leaks-fixed",
    "corruptions-fixed",
)
_ORDER = (
    "image-end-offset",
    "total-clusters",
    "check-errors",
    "leaks",
    "leaks-fixed",
    "allocated-clusters",
    "filename",
    "format",
    "fragmented-clusters",
    "compressed-clusters",
    "corruptions",
    "corruptions-fixed",
)


def add_parser(sub, common):
    p = sub.add_parser(
        "check",
        parents=[common],
        help="check an image for corruption and leaks",
        description=__doc__.split("\n\n")[0].strip("`"),
    )
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (default: probe)")
    p.add_argument(
        "-r", dest="repair", choices=("leaks", "all"), help="repair what can be repaired"
    )
    p.add_argument("--output", choices=("human", "json"), default="human")
    _images.add_force_share(p, "the image (not with -r)")
    p.add_argument("file", metavar="FILE")


def check_image(path, fmt=None, repair=False, progress=None, force_share=False) -> dict:
    """The check result dict for ``path`` (qemu-img's keys plus ``corruptions-found`` /
    ``leaks-found`` after a repair). Raises ``UnsupportedError`` for formats without a check."""
    # A check reads this image's metadata only: its backing chain stays closed (and may be missing).
    with _images.open_image(
        path, fmt, read_only=not repair, no_backing=True, force_share=force_share
    ) as img:
        if type(img.driver).check is BlockDriver.check:
            raise UnsupportedError(f"{path}: format {img.format!r} does not support checks")
        task = progress.task(f"checking {path}") if progress is not None else None
        result = img.check(repair=repair)
        if task is not None:
            task.update(completed=1, total=1)
    result["filename"] = path
    return result


def qemu_json(result: dict) -> dict:
    """The keys ``qemu-img check --output=json`` prints: four always, the others when non-zero."""
    out = {}
    for key in _ORDER:
        if key in _ALWAYS or (key in _WHEN_SET and result.get(key)):
            if key in result:
                out[key] = result[key]
    return out


def _human(result: dict, repaired: bool) -> list:
    lines = []
    if repaired and (result.get("corruptions-fixed") or result.get("leaks-fixed")):
        lines += [
            "The following inconsistencies were found and repaired:",
            "",
            f"    {result.get('leaks-fixed', 0)} leaked clusters",
            f"    {result.get('corruptions-fixed', 0)} corruptions",
            "",
            "Double checking the fixed image now...",
        ]
    c, leaks, errs = (
        result.get("corruptions", 0),
        result.get("leaks", 0),
        result.get("check-errors", 0),
    )
    if not (c or leaks or errs):
        lines.append("No errors were found on the image.")
    else:
        if c:
            lines += [
                f"{c} errors were found on the image.",
                "Data may be corrupted, or further writes to the image may corrupt it.",
            ]
        if leaks:
            if c:
                lines.append("")
            lines += [
                f"{leaks} leaked clusters were found on the image.",
                "This means waste of disk space, but no harm to data.",
            ]
        if errs:
            lines.append(f"{errs} internal errors have occurred during the check.")
    total = result.get("total-clusters")
    if total:
        alloc = result.get("allocated-clusters", 0)
        frag = result.get("fragmented-clusters", 0)
        comp = result.get("compressed-clusters", 0)
        lines.append(
            f"{alloc}/{total} = {100.0 * alloc / total:.2f}% allocated, "
            f"{100.0 * frag / alloc if alloc else 0:.2f}% fragmented, "
            f"{100.0 * comp / alloc if alloc else 0:.2f}% compressed clusters"
        )
    if result.get("image-end-offset"):
        lines.append(f"Image end offset: {result['image-end-offset']}")
    return lines


def run(args, env):
    if args.repair and args.force_share:
        raise UsageError(
            "check: -U/--force-share cannot be used with -r (a repair writes to the image)"
        )
    try:
        with progress_for(env, args.quiet) as progress:
            result = check_image(
                args.file,
                args.fmt,
                repair=bool(args.repair),
                progress=progress,
                force_share=args.force_share,
            )
    except UnsupportedError as exc:
        env.err(f"{env.program_name}: error: {exc}")
        return ExitStatus.NOT_SUPPORTED
    if args.output == "json":
        env.out(dump_json(qemu_json(result)))
    else:
        env.out("\n".join(_human(result, bool(args.repair))))
    return check_status(result)

"""``vblock stress [--duration S] [--queues N] [--depth D] [--size SIZE] [--image FILE] [--format FMT]
[--seed N] [--keep] [--output=json]``

The main job: N queues x D requests in flight of random reads, writes, flushes, discards and
write-zeroes through virtio-blk queues over a QED image made in a temporary directory (removed
afterwards unless ``--keep``), or over the existing ``--image`` (never created). Every written sector is stamped and every read
checked against a model of what may be there (``vblock.testing.stress`` explains it); the image is then
reopened, re-read and checked. Exit 0 only when every read matched, every request succeeded and
the check is clean: 2 on a data mismatch or a failed request (named with the host's errno, e.g.
ENOSPC), the check's code (2 corruptions, 3 leaks) otherwise.
"""

from __future__ import annotations

import dataclasses
import json

from vblock.cli import _images
from vblock.cli.output import UsageError, human_size, parse_size, table
from vblock.cli.progress import progress_for
from vblock.cli.status import MISMATCH, ExitStatus, check_status
from vblock.testing import stress as engine


def _positive_int(text):
    try:
        v = int(text)
    except ValueError:
        raise UsageError(f"invalid number {text!r}") from None
    if v < 1:
        raise UsageError(f"{text} must be at least 1")
    return v


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}


def _duration(text):
    """Seconds, optionally with a unit: ``20``, ``2.5s``, ``10m``, ``1h``."""
    unit = text[-1:].lower()
    scale = _DURATION_UNITS.get(unit)
    try:
        v = float(text[:-1] if scale else text) * (scale or 1)
    except ValueError:
        raise UsageError(
            f"invalid duration {text!r}: expected seconds or a unit (e.g. 20, 2.5s, 10m)"
        ) from None
    if v < 0:
        raise UsageError(f"invalid duration {text!r}: negative")
    return v


def add_parser(sub, common):
    p = sub.add_parser(
        "stress",
        parents=[common],
        help="verified random I/O through virtio-blk queues (the main job)",
        description=" ".join(__doc__.split("\n\n")[1].split()),
    )
    p.add_argument(
        "--duration",
        type=_duration,
        default=engine.DEFAULT_DURATION,
        metavar="DURATION",
        help=f"how long: seconds, or with a unit s, m, h (default {engine.DEFAULT_DURATION:g})",
    )
    p.add_argument(
        "--queues",
        type=_positive_int,
        default=engine.StressConfig.queues,
        metavar="N",
        help="virtqueues (default %(default)s)",
    )
    p.add_argument(
        "--depth",
        type=_positive_int,
        default=engine.StressConfig.depth,
        metavar="D",
        help="requests in flight per queue (default %(default)s)",
    )
    p.add_argument(
        "--size", default="256M", metavar="SIZE", help="size of a created image (default 256M)"
    )
    p.add_argument(
        "--image",
        metavar="FILE",
        help="stress this existing image instead of a temporary one (its data is overwritten)",
    )
    p.add_argument(
        "--format",
        metavar="FMT",
        help="image format (default: qed for new images, probe otherwise)",
    )
    p.add_argument(
        "--seed", type=int, metavar="N", help="random seed (default: from the clock; printed)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary directory and image")
    p.add_argument("--output", choices=("human", "json"), default="human")


def _stats(rep) -> str:
    return (
        f"{rep.iops:,.0f} IOPS  {rep.mbps:,.1f} MB/s  verified {rep.verified_blocks:,} blocks  "
        f"errors {rep.mismatch_count + rep.error_count}"
    )


def _check_text(rep) -> str:
    c = rep.check
    if c is None:
        return "not supported by the format"
    if rep.check_clean:
        return "clean"
    parts = [f"{c[k]} {k}" for k in ("corruptions", "leaks", "check-errors") if c.get(k)]
    return ", ".join(parts)


def summary_rows(rep):
    cfg = rep.config
    return [
        (
            "image",
            f"{rep.image} ({rep.format}, {human_size(rep.size)})" + (" kept" if rep.kept else ""),
        ),
        ("queues x depth", f"{cfg.queues} x {cfg.depth}"),
        ("seed", rep.seed),
        ("duration", f"{rep.elapsed:.1f} s"),
        (
            "requests",
            f"{rep.requests:,} (" + ", ".join(f"{k} {v:,}" for k, v in rep.ops.items()) + ")",
        ),
        ("IOPS", f"{rep.iops:,.0f}"),
        (
            "MB/s",
            f"{rep.mbps:,.1f} (read {rep.bytes_read / rep.elapsed / 1e6 if rep.elapsed else 0:,.1f}, "
            f"write {rep.bytes_written / rep.elapsed / 1e6 if rep.elapsed else 0:,.1f})",
        ),
        (
            "verified blocks",
            f"{rep.verified_blocks:,} read through the device ({rep.stamped_blocks:,} holding data of this run)"
            + (f", {rep.unverified_blocks:,} unknown" if rep.unverified_blocks else ""),
        ),
        ("after reopen", f"{rep.swept_blocks:,} blocks re-read and verified"),
        ("mismatches", f"{rep.mismatch_count:,}"),
        ("failed requests", f"{rep.error_count:,}"),
        ("image check", _check_text(rep)),
        ("result", "PASS" if rep.ok else "FAIL"),
    ]


def report_json(rep) -> dict:
    d = {
        "image": rep.image,
        "format": rep.format,
        "size": rep.size,
        "kept": rep.kept,
        "queues": rep.config.queues,
        "depth": rep.config.depth,
        "seed": rep.seed,
        "duration": rep.elapsed,
        "requests": rep.requests,
        "ops": rep.ops,
        "iops": rep.iops,
        "mbps": rep.mbps,
        "bytes-read": rep.bytes_read,
        "bytes-written": rep.bytes_written,
        "verified-blocks": rep.verified_blocks,
        "stamped-blocks": rep.stamped_blocks,
        "unverified-blocks": rep.unverified_blocks,
        "swept-blocks": rep.swept_blocks,
        "mismatch-count": rep.mismatch_count,
        "mismatches": [dataclasses.asdict(m) for m in rep.mismatches],
        "error-count": rep.error_count,
        "errors": rep.errors,
        "check": rep.check,
        "ok": rep.ok,
    }
    return d


def exit_status(rep) -> ExitStatus:
    if rep.mismatch_count or rep.error_count:
        return MISMATCH
    if rep.check is not None:
        return check_status(rep.check)
    return ExitStatus.SUCCESS


def run(args, env):
    cfg = engine.StressConfig(
        duration=args.duration,
        queues=args.queues,
        depth=args.depth,
        size=parse_size(args.size),
        image=args.image,
        format=args.format,
        seed=args.seed,
        keep=args.keep,
    )
    _images.check_format(cfg.format)
    with progress_for(env, args.quiet) as progress:
        task = progress.task("stress", total=cfg.duration or 1)

        def tick(rep, fraction):
            task.update(completed=fraction * (cfg.duration or 1), stats=_stats(rep))

        rep = engine.run(cfg, progress=tick if progress.enabled else None)
        task.update(completed=cfg.duration or 1, stats=_stats(rep))
    for m in rep.mismatches:
        env.err(f"{env.program_name}: error: {m.describe()}")
    if rep.mismatch_count > len(rep.mismatches):
        env.err(
            f"{env.program_name}: error: ... {rep.mismatch_count - len(rep.mismatches)} more mismatched sectors"
        )
    for e in rep.errors:
        env.err(f"{env.program_name}: error: {e}")
    if rep.check is not None and not rep.check_clean:
        env.err(f"{env.program_name}: error: image check after the run: {_check_text(rep)}")
    if args.output == "json":
        env.out(json.dumps(report_json(rep), indent=4))
    else:
        env.out(table(("stress", ""), summary_rows(rep), aligns=("<", "<")))
    return exit_status(rep)

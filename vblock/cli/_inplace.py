"""``vblock convert --in-place -O qed [--drop-snapshots] IMAGE``: qcow2 to QED in the same file.

The conversion itself, its order of writes and why it is crash-safe are
``vblock.block.inplace``'s; this module checks the arguments and shows progress on a terminal.
Run on a QED image that carries need-check (an interrupted conversion), it finishes it.
"""

from __future__ import annotations

from vblock.cli.output import UsageError, human_size
from vblock.cli.progress import progress_for
from vblock.cli.status import ExitStatus


def add_arguments(p):
    p.add_argument(
        "--in-place",
        dest="in_place",
        action="store_true",
        help="convert a qcow2 IMAGE into QED in the same file (only -O qed): data clusters "
        "stay where they are, only metadata is written",
    )
    p.add_argument(
        "--drop-snapshots",
        dest="drop_snapshots",
        action="store_true",
        help="with --in-place: convert an image that has internal snapshots, losing them",
    )


def run(args, env):
    from vblock.block.inplace import convert_in_place

    if args.out_fmt != "qed":
        raise UsageError("vblock convert --in-place: only -O qed is supported")
    if args.dst is not None or args.src is None:
        raise UsageError("vblock convert --in-place takes exactly one IMAGE")
    for flag, given in (
        ("-B", args.backing),
        ("-o", args.options),
        ("-n", args.skip_create),
        ("-U", args.force_share),
    ):
        if given:
            raise UsageError(f"vblock convert --in-place: {flag} does not apply")
    if args.fmt not in (None, "qcow2", "qed"):
        raise UsageError("vblock convert --in-place: the source must be qcow2")
    with progress_for(env, args.quiet) as progress:
        task = progress.task(f"converting {args.src} in place", total=None)

        def report(done, total):
            task.update(completed=done, total=total)

        stats = convert_in_place(args.src, drop_snapshots=args.drop_snapshots, progress=report)
    if not args.quiet:
        env.err(
            f"{args.src}: converted to QED in place; {human_size(stats.bytes_written)} written "
            f"({stats.clusters_materialized} clusters written out, {stats.clusters_moved} moved)"
        )
    return ExitStatus.SUCCESS

"""``vblock create -f qed|raw [-o cluster_size=…,table_size=…] [-b BACKING -F FMT] FILE [SIZE]``

Makes an empty image at FILE as qemu-img does (``_destination`` has the rules): a regular file is
made under a temporary name and renamed into place once complete, so it is never half-written, and
keeps the mode and owner of the file it replaces; a symlink is followed; a device is written in
place and must hold SIZE (raw only: QED cannot live on a device). SIZE takes suffixes (``10G``,
``512M``); with a backing file it defaults to the backing file's size. A relative BACKING is
relative to FILE's directory (and stored as given), as qemu-img does. ``-o help`` lists the
format's options.
"""

from __future__ import annotations

import vblock
from vblock.cli import _destination, _images
from vblock.cli.output import UsageError, human_size, parse_size
from vblock.cli.status import ExitStatus


def add_parser(sub, common):
    p = sub.add_parser(
        "create",
        parents=[common],
        help="create an empty image",
        description=__doc__.split("\n\n")[0].strip("`"),
    )
    p.add_argument(
        "-f", dest="fmt", default="raw", metavar="FMT", help="image format (raw, qed; default raw)"
    )
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        help="format options, e.g. cluster_size=64k,table_size=4",
    )
    p.add_argument("-b", dest="backing", metavar="BACKING", help="backing file (qed)")
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="backing file format")
    p.add_argument("file", metavar="FILE", nargs="?")  # optional for -o help only
    p.add_argument("size", metavar="SIZE", nargs="?", help="virtual size (10G, 512M ...)")


def run(args, env):
    fmt = _images.check_creatable(args.fmt)
    if _images.wants_help(args.options):
        env.out(_images.options_help(fmt))
        return ExitStatus.SUCCESS
    if args.file is None:
        raise UsageError("vblock create: the following arguments are required: FILE")
    options = _images.parse_options(args.options)
    backing = args.backing or options.pop("backing_file", None)
    backing_fmt = args.backing_fmt or options.pop("backing_fmt", None)
    _images.check_format(backing_fmt)
    if args.backing_fmt and not backing:
        raise UsageError("create: -F needs a backing file (-b)")
    size = parse_size(args.size) if args.size is not None else None
    if backing:
        where = _images.backing_location(args.file, backing)
        with _images.open_image(where, backing_fmt) as b:
            backing_fmt = backing_fmt or b.format
            if size is None:
                size = b.size
        options["backing_file"] = backing
        options["backing_fmt"] = backing_fmt
    if size is None:
        raise UsageError(
            "create: the image size is required (e.g. vblock create -f qed disk.qed 10G)"
        )
    with _destination.new_image(args.file) as dest:
        vblock.create_image(dest.path, fmt, size, **options).close()
    if not args.quiet:
        extra = "".join(f" {k}={v}" for k, v in options.items())
        env.out(f"Formatting '{args.file}', fmt={fmt} size={size} ({human_size(size)}){extra}")
    return ExitStatus.SUCCESS

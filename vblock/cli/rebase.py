"""``vblock rebase -u -b NEW [-F FMT] [-f FMT] FILE``

Points FILE at a new backing file (``-b ""`` removes it). Only the unsafe mode (``-u``) exists: it
rewrites the header and copies nothing, so the guest's view changes wherever the old and new
backing files differ; use it when they hold the same data (a moved or converted backing file).
The old backing file is never opened, so this mends an image whose backing file is missing.
"""

from __future__ import annotations

import os

from vblock.cli import _images
from vblock.cli.output import UsageError
from vblock.cli.status import ExitStatus
from vblock.nbd.uri import is_nbd_uri


def add_parser(sub, common):
    p = sub.add_parser(
        "rebase",
        parents=[common],
        help="change an image's backing file",
        description=__doc__.split("\n\n")[0].strip("`"),
    )
    p.add_argument(
        "-u", dest="unsafe", action="store_true", help="only rewrite the backing file name"
    )
    p.add_argument(
        "-b", dest="backing", required=True, metavar="NEW", help='new backing file ("" for none)'
    )
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the new backing file")
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (default: probe)")
    p.add_argument("file", metavar="FILE")


def run(args, env):
    if not args.unsafe:
        raise UsageError("rebase: only unsafe rebase is supported: give -u (it copies no data)")
    _images.check_format(args.backing_fmt)
    new = args.backing or None
    fmt = args.backing_fmt
    if new is not None:
        where = _images.backing_location(args.file, new)
        if fmt is None:  # probe now, so a raw backing file is recorded as raw (never probed again)
            with _images.open_image(where, no_backing=True) as b:
                fmt = b.format
        elif not os.path.exists(where) and not is_nbd_uri(where):
            raise FileNotFoundError(2, "No such file or directory", where)
    # Only the header changes: the old backing file is never opened (it may be missing, which is
    # often why the image is rebased), nor the new one's chain.
    with _images.open_image(args.file, args.fmt, read_only=False, no_backing=True) as img:
        img.change_backing(new, fmt)
    return ExitStatus.SUCCESS

"""``vblock convert [-f FMT] -O FMT [-o OPTIONS] [-B BACKING [-F FMT]] [-t CACHE] [-T CACHE] [-m N]
SRC DST``

Copies what the guest sees in SRC into a new DST image of format ``-O`` (raw <-> qed, qed -> qed).
Only data is copied: the source's block status (QED tables, SEEK_DATA/SEEK_HOLE on raw files) says
where it is, and blocks of zeros inside data are skipped too, since a new image reads as zeros.
Without ``-B`` the backing chain is flattened; with ``-B`` the new image gets that backing file and
receives only what the source's top layer allocates (zeros included, so they still hide the
backing file). ``-m`` requests are in flight at once (default 16). A raw source read through the
page cache is mapped rather than read: its bytes go from its page cache to the destination's in
one copy instead of two.

DST is treated as qemu-img does (``_destination`` has the rules): a regular file is written under
a temporary name and renamed into place at the end, so it is never left half-written by a failed
or interrupted run, and keeps the mode and owner of the file it replaces; a symlink is followed; a
device is written in place (raw only) and must hold the image. A device does not read as zeros, so
the copy writes the source's zeros there too. ``-n`` writes into an existing DST of format ``-O``
without creating it, as ``qemu-img convert -n``: DST must exist and be at least as large as SRC,
no ``-o``/``-B`` apply, and the zeros are written as well. ``-o help`` lists ``-O``'s options.
``-t`` is the destination's cache mode, with
``qemu-img convert``'s meanings and default: ``unsafe`` (default: nothing is flushed, so until the
kernel writes the page cache back, a crash of the host may lose part of DST), ``writeback``
(flushed before the rename: DST is durable when the command ends), or ``none`` (O_DIRECT, then
flushed). With ``writeback`` the destination's writeback starts every 64 MiB as the copy goes, so
the final flush finds little left to write. ``-T`` is the source's (default ``writeback``).

This module parses the command line, places the destination and reports; the copy itself is
``vblock.block.convert``'s (its docstring states the engine's contract).
"""

from __future__ import annotations

import contextlib
import errno
import os
import time

import vblock
from vblock.block import convert as engine
from vblock.cli import _destination, _images, _inplace
from vblock.cli.output import UsageError, human_size
from vblock.cli.progress import Progress, progress_for
from vblock.cli.status import ExitStatus

DEFAULT_DEPTH = engine.DEFAULT_DEPTH


def add_parser(sub, common):
    p = sub.add_parser(
        "convert",
        parents=[common],
        help="copy an image into a new one, maybe of another format",
        description=" ".join(__doc__.split("\n\n")[1].split()),
    )
    p.add_argument("-f", dest="fmt", metavar="FMT", help="source format (default: probe)")
    p.add_argument(
        "-O", dest="out_fmt", required=True, metavar="FMT", help="destination format (raw, qed)"
    )
    p.add_argument(
        "-o",
        dest="options",
        metavar="OPTIONS",
        help="destination format options (cluster_size=64k,...)",
    )
    p.add_argument(
        "-n",
        dest="skip_create",
        action="store_true",
        help="write into the existing DST instead of creating it (it must be at least as large as SRC)",
    )
    p.add_argument(
        "-B", dest="backing", metavar="BACKING", help="give the destination this backing file"
    )
    p.add_argument("-F", dest="backing_fmt", metavar="FMT", help="format of the -B backing file")
    p.add_argument(
        "-t",
        dest="cache",
        choices=("none", "writeback", "unsafe"),
        default="unsafe",
        help="destination cache mode (default unsafe, as qemu-img convert: no flush; "
        "writeback or none make DST durable before the command ends)",
    )
    p.add_argument(
        "-T",
        dest="src_cache",
        choices=("none", "writeback", "unsafe"),
        default="writeback",
        help="source cache mode (default writeback)",
    )
    p.add_argument(
        "-m",
        dest="depth",
        type=int,
        default=DEFAULT_DEPTH,
        metavar="N",
        help=f"requests in flight (default {DEFAULT_DEPTH})",
    )
    _images.add_force_share(p, "the source")
    _inplace.add_arguments(p)
    p.add_argument("src", metavar="SRC", nargs="?")  # SRC and DST are optional for -o help only
    p.add_argument("dst", metavar="DST", nargs="?")


def convert(
    src_path,
    dst_path,
    out_fmt,
    *,
    fmt=None,
    options=None,
    backing=None,
    backing_fmt=None,
    cache="unsafe",
    src_cache="writeback",
    depth=DEFAULT_DEPTH,
    progress=None,
    skip_create=False,
    force_share=False,
) -> dict:
    """Convert ``src_path`` to a new ``dst_path`` (or into the existing one with ``skip_create``);
    returns statistics. See the module docstring. ``force_share`` opens the source as ``-U`` does."""
    _images.check_creatable(out_fmt)
    _images.check_format(backing_fmt)
    if depth < 1:
        raise UsageError("convert: -m must be at least 1")
    options = dict(options or {})
    if skip_create and (options or backing or backing_fmt):
        raise UsageError(
            "convert: -n writes into the existing image as it is: -o, -B and -F create one"
        )
    if backing:
        where = (
            backing
            if os.path.isabs(backing)
            else os.path.join(os.path.dirname(os.path.abspath(dst_path)), backing)
        )
        with _images.open_image(where, backing_fmt) as b:
            backing_fmt = backing_fmt or b.format
        options["backing_file"] = backing
        options["backing_fmt"] = backing_fmt
    elif backing_fmt:
        raise UsageError("convert: -F needs -B")
    if skip_create and not os.path.exists(dst_path):
        raise FileNotFoundError(
            errno.ENOENT, "no such file (-n writes into an existing image)", dst_path
        )
    if os.path.exists(dst_path) and os.path.samefile(src_path, dst_path):
        raise UsageError(f"convert: {dst_path} is the source image")
    t0 = time.perf_counter()
    with _images.open_image(src_path, fmt, cache=src_cache, force_share=force_share) as src:
        size = src.size
        if out_fmt == "qed" and not skip_create:
            size = -(-size // 512) * 512  # QED sizes are whole sectors (qemu-img rounds up too)
        if skip_create:
            where = contextlib.nullcontext(
                _destination.Destination(dst_path, dst_path, device=False, zero_init=False)
            )
        else:
            where = _destination.new_image(dst_path, durable=cache != "unsafe")
        with where as dest:
            if not skip_create:
                vblock.create_image(dest.path, out_fmt, size, **options).close()
            dst = vblock.open_image(dest.path, format=out_fmt, cache=cache)
            try:
                if dst.size < src.size:  # -n (a device too small was refused at create)
                    raise ValueError(
                        f"convert: {dst_path} is smaller ({dst.size} bytes) than the source "
                        f"({src.size} bytes)"
                    )

                def track(total):  # the progress task, sized once the copy is planned
                    task = (progress or Progress()).task(
                        f"converting {os.path.basename(src_path)}", total=total, unit="bytes"
                    )
                    return task.advance

                stats = engine.convert(
                    src,
                    dst,
                    keep_backing=bool(backing),
                    zero_init=dest.zero_init,
                    depth=depth,
                    progress=track,
                )
            finally:
                dst.close()
    return {
        "size": size,
        "data": stats.planned,
        "copied": stats.copied,
        "zero-skipped": stats.zero_skipped,
        "seconds": time.perf_counter() - t0,
    }


def run(args, env):
    if args.in_place:
        return _inplace.run(args, env)
    if _images.wants_help(args.options):
        env.out(_images.options_help(_images.check_creatable(args.out_fmt)))
        return ExitStatus.SUCCESS
    if args.src is None or args.dst is None:
        raise UsageError(
            "vblock convert: the following arguments are required: "
            + ("SRC, DST" if args.src is None else "DST")
        )
    options = _images.parse_options(args.options)
    with progress_for(env, args.quiet) as progress:
        stats = convert(
            args.src,
            args.dst,
            args.out_fmt,
            fmt=args.fmt,
            options=options,
            backing=args.backing,
            backing_fmt=args.backing_fmt,
            cache=args.cache,
            src_cache=args.src_cache,
            depth=args.depth,
            progress=progress,
            skip_create=args.skip_create,
            force_share=args.force_share,
        )
    if not args.quiet:
        env.err(
            f"{args.dst}: {human_size(stats['copied'])} of data copied "
            f"({human_size(stats['zero-skipped'])} of zeros skipped) in {stats['seconds']:.2f} s"
        )
    return ExitStatus.SUCCESS

"""``vblock resize [--shrink] [-f FMT] FILE [+|-]SIZE``

Sets an image's virtual size (``+1G`` / ``-512M`` are relative to the current size; ``-512M``
needs no ``--`` before it). Shrinking
needs ``--shrink``, as with qemu-img, because it drops the guest's data past the new end; QED
images cannot shrink.
"""

from __future__ import annotations

import re

from vblock.cli import _images
from vblock.cli.output import MAX_BYTES, UsageError, human_size, parse_size
from vblock.cli.status import ExitStatus


def add_parser(sub, common):
    p = sub.add_parser(
        "resize",
        parents=[common],
        help="grow (or shrink) an image",
        description=__doc__.split("\n\n")[0].strip("`"),
    )
    p.add_argument("-f", dest="fmt", metavar="FMT", help="image format (default: probe)")
    p.add_argument("--shrink", action="store_true", help="allow making the image smaller")
    p.add_argument("file", metavar="FILE")
    p.add_argument("size", metavar="SIZE")
    # ``-512M`` is a size, as qemu-img reads it, not an unknown option: no option of this verb
    # starts with a digit, so anything that does is a (negative) size
    p._negative_number_matcher = re.compile(r"^-\d")


def run(args, env):
    text = args.size
    sign = text[:1] if text[:1] in "+-" else ""
    delta = parse_size(text[1:] if sign else text)
    with _images.open_image(args.file, args.fmt, read_only=False) as img:
        old = img.size
        new = old + delta if sign == "+" else old - delta if sign == "-" else delta
        if new < 0:
            raise UsageError(f"resize: {text} would make the size negative")
        if new > MAX_BYTES:
            raise UsageError(
                f"resize: {text} would make the size larger than {MAX_BYTES} bytes, "
                "the most a host file can hold"
            )
        if new < old and not args.shrink:
            raise UsageError(
                f"resize: {human_size(new)} is smaller than the current {human_size(old)}; "
                "give --shrink to drop the data past the new end"
            )
        img.resize(new)
        final = img.size
    if not args.quiet:
        env.out(f"Image resized to {final} bytes ({human_size(final)}).")
    return ExitStatus.SUCCESS

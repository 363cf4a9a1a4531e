"""``vblock compare [-f FMT] [-F FMT] [-s] A B``

Whether two images show the guest the same bytes, whatever their formats. Runs that both images
report as zero are not read. Exit codes are qemu-img compare's: 0 when they match, 1 with the
first differing offset when they do not, 2 when an image cannot be opened (or the arguments are
wrong), 3 when block status cannot be read, 4 when data cannot be read. Images of different sizes match when the larger one reads as
zeros past the end of the smaller, unless ``-s`` (strict) is given.
"""

from __future__ import annotations

import contextlib

from vblock.block.interface import ZERO
from vblock.cli import _images
from vblock.cli.progress import progress_for
from vblock.cli.status import DIFFERENT, CompareStatus

ERROR_STATUS = CompareStatus.OPEN_ERROR  # what the boundary answers for errors not tagged below

CHUNK = 4 << 20  # bytes compared per step
DEPTH = 4  # steps in flight per image


def add_parser(sub, common):
    p = sub.add_parser(
        "compare",
        parents=[common],
        help="check that two images hold the same data",
        description=__doc__.split("\n\n")[0].strip("`"),
    )
    p.add_argument("-f", dest="fmt_a", metavar="FMT", help="format of A (default: probe)")
    p.add_argument("-F", dest="fmt_b", metavar="FMT", help="format of B (default: probe)")
    p.add_argument(
        "-s", dest="strict", action="store_true", help="images of different sizes differ"
    )
    _images.add_force_share(p, "both images")
    p.add_argument("a", metavar="A")
    p.add_argument("b", metavar="B")


@contextlib.contextmanager
def _failing_with(status):
    """An error raised inside ends the command with ``status`` (the boundary reads ``exit_status``)."""
    try:
        yield
    except Exception as exc:
        if getattr(exc, "exit_status", None) is None:
            with contextlib.suppress(AttributeError):
                exc.exit_status = status
        raise


def _read(img, offset, length):
    with _failing_with(CompareStatus.READ_ERROR):
        return img.read(offset, length)


def _zero_runs(img, start, end):
    """[(start, end)] of [start, end) that ``img`` reports as zero."""
    with _failing_with(CompareStatus.STATUS_ERROR):
        runs = img.block_status(start, end - start)
    return [(r.offset, r.offset + r.length) for r in runs if r.kind == ZERO]


def _both_zero(a, b, start, end):
    """Sub-ranges of [start, end) where both report zeros, and the rest as ranges to read."""
    za = _zero_runs(a, start, end)
    zb = _zero_runs(b, start, end) if b is not None else [(start, end)]
    both = []
    i = j = 0
    while i < len(za) and j < len(zb):
        lo, hi = max(za[i][0], zb[j][0]), min(za[i][1], zb[j][1])
        if lo < hi:
            both.append((lo, hi))
        if za[i][1] < zb[j][1]:
            i += 1
        else:
            j += 1
    todo, pos = [], start
    for lo, hi in both:
        if lo > pos:
            todo.append((pos, lo))
        pos = hi
    if pos < end:
        todo.append((pos, end))
    return todo


def _first_difference(x: bytes, y: bytes) -> int:
    lo, hi = 0, len(x)
    while hi - lo > 4096:  # halve in C-speed comparisons
        mid = (lo + hi) // 2
        if x[lo:mid] != y[lo:mid]:
            hi = mid
        else:
            lo = mid
    for k in range(lo, hi):
        if x[k] != y[k]:
            return k
    return hi


def compare_images(a, b, progress=None):
    """The first offset where ``a`` and ``b`` differ over their common size, or None."""
    common = min(a.size, b.size)
    task = progress.task("comparing", total=common, unit="bytes") if progress else None
    pos = 0
    while pos < common:
        end = min(common, pos + (1 << 30))
        for lo, hi in _both_zero(a, b, pos, end):
            off = lo
            while off < hi:
                n = min(CHUNK, hi - off)
                x, y = _read(a, off, n), _read(b, off, n)
                if x != y:
                    return off + _first_difference(x, y)
                off += n
        if task:
            task.update(completed=end)
        pos = end
    return None


def _tail_nonzero(img, start):
    """First offset >= start where ``img`` does not read zeros, or None."""
    for lo, hi in _both_zero(img, None, start, img.size):
        off = lo
        while off < hi:
            n = min(CHUNK, hi - off)
            data = _read(img, off, n)
            if data.count(0) != n:
                return off + next(k for k, c in enumerate(data) if c)
            off += n
    return None


def run(args, env):
    share = args.force_share
    with (
        _images.open_image(args.a, args.fmt_a, force_share=share) as a,
        _images.open_image(args.b, args.fmt_b, force_share=share) as b,
    ):
        with progress_for(env, args.quiet) as progress:
            at = compare_images(a, b, progress)
            if at is None and a.size != b.size:
                if args.strict:
                    env.out(f"Strict mode: Image size mismatch! ({a.size} vs {b.size} bytes)")
                    return DIFFERENT
                bigger, name = (a, args.a) if a.size > b.size else (b, args.b)
                at = _tail_nonzero(bigger, min(a.size, b.size))
                if at is not None:
                    env.out(
                        f"Content mismatch at offset {at}! ({name} has data past the end of the other image)"
                    )
                    return DIFFERENT
    if at is not None:
        env.out(f"Content mismatch at offset {at}!")
        return DIFFERENT
    env.out("Images are identical.")
    return CompareStatus.IDENTICAL

"""Where output goes and how it looks: the ``Environment`` (streams and terminal flags, injected
by tests), size parsing (``10G``, ``512M``) and printing, JSON, and plain tables.

stdout carries results (JSON, tables, the lines a script would parse); stderr carries people's
messages: progress, warnings, errors.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from typing import TextIO

__all__ = ["Environment", "UsageError", "parse_size", "human_size", "dump_json", "table"]


class UsageError(Exception):
    """A bad command line: the boundary prints ``vblock: error: <message>`` and exits 1."""


@dataclasses.dataclass
class Environment:
    """The streams a run of ``vblock`` talks to. ``main`` builds the real one; tests pass their own
    (``io.StringIO`` streams, ``*_isatty=False``) and run verbs in-process."""

    stdout: TextIO = None
    stderr: TextIO = None
    stdout_isatty: bool | None = None
    stderr_isatty: bool | None = None
    program_name: str = "vblock"

    def __post_init__(self):
        if self.stdout is None:
            self.stdout = sys.stdout
        if self.stderr is None:
            self.stderr = sys.stderr
        if self.stdout_isatty is None:
            self.stdout_isatty = _isatty(self.stdout)
        if self.stderr_isatty is None:
            self.stderr_isatty = _isatty(self.stderr)

    def out(self, text: str = "") -> None:
        self.stdout.write(text + "\n")

    def err(self, text: str) -> None:
        self.stderr.write(text + "\n")
        self.stderr.flush()

    def warn(self, text: str) -> None:
        self.err(f"{self.program_name}: warning: {text}")


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


MAX_BYTES = (1 << 63) - 1  # the largest file offset (off_t) a Linux host can hold
_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5, "E": 6}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtTpPeE]?)(?:i?[bB])?\s*$")


def parse_size(text: str, what: str = "size") -> int:
    """Bytes for ``10G``, ``512M``, ``1.5G``, ``4096``, ``64k``, ``2GiB`` (powers of 1024, as
    qemu-img). Raises ``UsageError`` naming the text for anything else (``10Q``, ``-1``, ``1.3``) and
    for sizes past ``MAX_BYTES`` (``16E``)."""
    m = _SIZE_RE.match(str(text))
    if not m:
        raise UsageError(
            f"invalid {what} {text!r}: expected a number with an optional suffix k, M, G, T, P or E"
        )
    from fractions import Fraction  # imported here: most runs parse no size

    number, unit = m.groups()
    value = Fraction(number) * 1024 ** _UNITS[unit.upper()]
    if value.denominator != 1:
        raise UsageError(f"invalid {what} {text!r}: not a whole number of bytes")
    value = int(value)
    if value > MAX_BYTES:
        raise UsageError(
            f"invalid {what} {text!r}: larger than {MAX_BYTES} bytes, the most a host file can hold"
        )
    return value


def human_size(n: int) -> str:
    """qemu-img's style: three significant digits and a binary unit (``580 KiB``, ``1.5 GiB``)."""
    if n is None:
        return "unavailable"
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value = float(n)
    i = 0
    while value >= 1024 and i < len(units) - 1:
        value /= 1024
        i += 1
    if i == 0:
        return f"{n} B"
    text = f"{value:.3g}"
    if "e" in text:  # 1000..1023 of a unit
        text = f"{value:.0f}"
    return f"{text} {units[i]}"


def dump_json(obj) -> str:
    """Indented JSON, as ``qemu-img --output=json`` prints objects."""
    import json  # imported here: most runs print no JSON

    return json.dumps(obj, indent=4)


def table(headers, rows, aligns=None) -> str:
    """A plain text table (no colour, no box characters): safe for pipes and logs."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    aligns = aligns or ["<"] + [">"] * (len(headers) - 1)
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(f"{c:{a}{w}}" for c, a, w in zip(r, aligns, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)

"""``vblock bench host|block|qed|virtio|convert|all [--json] [OPTIONS...]``

The benchmarks in one place. Each measures vblock beside a peer in the same run (fio, qemu-img
bench, qemu-img convert, or the layer below) and reports ratios; ``all`` runs every one and prints
one markdown table (or, with ``--json``, one JSON object per row). Options after the name go to
the benchmark itself (``vblock bench host --duration 1``). With ``all`` each benchmark runs in a
process of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import subprocess
import sys

from vblock.cli.output import UsageError
from vblock.cli.progress import progress_for
from vblock.cli.status import ExitStatus


def names():
    from vblock.bench import NAMES

    return tuple(NAMES) + tuple(n for n in ("convert",) if n not in NAMES)


def add_parser(sub, common):
    p = sub.add_parser(
        "bench",
        parents=[common],
        help="run benchmarks against fio / qemu-img",
        description=" ".join(__doc__.split("\n\n")[1].split()),
    )
    p.add_argument("name", metavar="NAME", help=f"one of {', '.join(names())}, or all")
    p.add_argument("--json", action="store_true", help="one JSON object per row")
    p.add_argument(
        "rest", nargs=argparse.REMAINDER, metavar="OPTIONS", help="options for the benchmark itself"
    )


def _run_one(name, argv):
    """Run benchmark ``name`` with ``argv`` in this process; returns (exit code, captured stdout)."""
    module = importlib.import_module(f"vblock.bench.{name}")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = module.main(list(argv))
    return rc or 0, buf.getvalue()


def _run_apart(name, argv, env):
    """Run benchmark ``name`` in a process of its own (``all``: no benchmark inherits another's
    threads, rings, caches or garbage); its stderr passes through."""
    p = subprocess.run(
        [sys.executable, "-m", "vblock.bench", name, *argv],
        stdout=subprocess.PIPE,
        stderr=None if env.stderr is sys.stderr else subprocess.PIPE,
        text=True,
    )
    if p.stderr:
        env.stderr.write(p.stderr)
    return p.returncode, p.stdout


def run(args, env):
    known = names()
    if args.name != "all" and args.name not in known:
        raise UsageError(
            f"bench: unknown benchmark {args.name!r}: expected one of {', '.join(known)} or all"
        )
    # Everything after NAME lands in args.rest: pick out vblock's own flags there too
    # ("vblock bench all -q"); the rest is the benchmark's.
    if "--json" in args.rest:
        args.json = True
    if "-q" in args.rest or "--quiet" in args.rest:
        args.quiet = True
    rest = [a for a in args.rest if a not in ("--json", "-q", "--quiet")]
    if args.name != "all":
        with progress_for(env, args.quiet) as progress:
            progress.task(f"bench {args.name}")
            rc, text = _run_one(args.name, (["--json"] if args.json else []) + rest)
        env.stdout.write(text)
        return rc
    from vblock.bench import Row, report

    rows = []
    failed = []
    with progress_for(env, args.quiet) as progress:
        for name in progress.track(known, "benchmarks"):
            rc, text = _run_apart(name, ["--json"] + rest, env)
            if rc:
                failed.append(name)
                continue
            for line in text.splitlines():
                line = line.strip()
                if line.startswith("{"):
                    d = json.loads(line)
                    rows.append(Row(**{k: d[k] for k in Row.__dataclass_fields__ if k in d}))
    report(rows, as_json=args.json, out=env.stdout)
    for name in failed:
        env.err(f"{env.program_name}: error: benchmark {name} failed")
    return ExitStatus.ERROR if failed else ExitStatus.SUCCESS

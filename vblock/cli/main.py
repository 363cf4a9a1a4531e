"""``vblock``: the command line, and its one error boundary.

``main(argv, env)`` parses the arguments, runs one verb and turns every failure into an exit code:

* ``UsageError`` (bad arguments), ``VblockError`` (``ImageError``, unknown format or option...),
  ``OSError`` and ``ValueError`` -> one ``vblock: error: ...`` line on stderr, exit 1 (or the
  verb's own error code: the exception's ``exit_status``, else the verb module's ``ERROR_STATUS``;
  ``compare`` has qemu-img's);
* Ctrl-C -> ``vblock: interrupted``, exit 130;
* anything else is a bug: one line naming it and asking for ``--debug``, exit 1.

``--debug`` lets every exception escape with its traceback (and turns on debug logging).
Verbs live one per module (``create.py``, ``info.py`` ...); each has ``add_parser(subparsers,
common)`` and ``run(args, env) -> int``, does no error handling of its own and writes only
through ``env`` (see ``output.Environment``), so tests run them in-process.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import warnings

import vblock
from vblock.cli.output import Environment, UsageError
from vblock.cli.status import ExitStatus
from vblock.errors import VblockError

__all__ = ["main", "command", "build_parser", "VERBS"]

VERBS = (
    "create",
    "info",
    "check",
    "map",
    "convert",
    "compare",
    "resize",
    "rebase",
    "bench",
    "stress",
    "serve",
)


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors by raising (the boundary prints them) and writes help and
    usage to the injected environment instead of the process's streams."""

    env: Environment = None

    def error(self, message):
        # "vblock: error: vblock create: the following arguments are required: FILE"
        raise UsageError(f"{self.prog}: {message}" if " " in self.prog else message)

    def _print_message(self, message, file=None):
        if not message:
            return
        env = self.env
        if env is None:
            super()._print_message(message, file)
            return
        (env.stderr if file is sys.stderr else env.stdout).write(message)


def build_parser(env: Environment | None = None, verbs=VERBS) -> argparse.ArgumentParser:
    """The whole command line; with ``verbs``, only those subcommands (``main`` builds just the
    one it runs: each verb module imports its own dependencies, and the stress run, for one,
    pulls in the whole virtio stack)."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("common options")
    # SUPPRESS: a flag given before the verb is not reset by the verb's own defaults
    g.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress display"
    )
    g.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="show tracebacks and debug logs",
    )

    class Parser(_Parser):
        pass

    Parser.env = env
    parser = Parser(
        prog="vblock",
        description="Make, inspect, convert, measure and stress block images (raw, QED).",
        parents=[common],
    )
    parser.add_argument("--version", action="version", version=f"vblock {vblock.__version__}")
    sub = parser.add_subparsers(dest="verb", metavar="COMMAND", parser_class=Parser)
    for name in verbs:
        importlib.import_module(f"vblock.cli.{name}").add_parser(sub, common)
    return parser


def _verb_of(argv) -> tuple:
    """The verbs ``main`` must register to parse ``argv``: the one it names, or all of them (for
    ``--help``, a missing or misspelt verb, whose messages list every choice)."""
    for arg in argv:
        if arg in ("-q", "--quiet", "--debug"):
            continue
        if arg == "--version":
            return ()
        return (arg,) if arg in VERBS else VERBS
    return VERBS


def _error_status(exc: BaseException, verbs) -> int:
    """The exit code for a reported error: the exception's ``exit_status``, else the verb's
    ``ERROR_STATUS``, else ``ExitStatus.ERROR``."""
    status = getattr(exc, "exit_status", None)
    if status is None and len(verbs) == 1:
        module = sys.modules.get(f"vblock.cli.{verbs[0]}")
        status = getattr(module, "ERROR_STATUS", None)
    return int(ExitStatus.ERROR if status is None else status)


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        where = exc.filename if exc.filename2 is None else f"{exc.filename} -> {exc.filename2}"
        return f"{where}: {exc.strerror}"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, KeyError):  # str() of a KeyError is the repr of its key
        text = f"missing {text}"
    return " ".join(text.split())  # one line, always


@contextlib.contextmanager
def _diagnostics(env: Environment, debug: bool):
    """Route warnings and vblock's log records to stderr as ``vblock: warning: ...`` lines."""
    handler = logging.StreamHandler(env.stderr)
    handler.setFormatter(
        logging.Formatter(
            f"{env.program_name}: %(levelname)s: %(message)s"
            if debug
            else f"{env.program_name}: warning: %(message)s"
        )
    )
    log = logging.getLogger("vblock")
    old_level, old_propagate = log.level, log.propagate
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.WARNING)
    log.propagate = False
    old_show = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        env.warn(" ".join(str(message).split()))

    warnings.showwarning = show
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = show
            yield
    finally:
        warnings.showwarning = old_show
        log.removeHandler(handler)
        log.setLevel(old_level)
        log.propagate = old_propagate


def main(argv=None, env: Environment | None = None) -> int:
    """Run ``vblock`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    env = env or Environment()
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    prog = env.program_name
    try:
        with _diagnostics(env, debug):
            parser = build_parser(env, _verb_of(argv))
            try:
                args = parser.parse_args(argv)
            except SystemExit as exc:  # --help / --version
                return int(exc.code or 0)
            if args.verb is None:
                parser.print_usage(env.stderr)
                raise UsageError("a command is required (try: vblock --help)")
            args.quiet = getattr(args, "quiet", False)
            args.debug = getattr(args, "debug", False)
            module = importlib.import_module(f"vblock.cli.{args.verb}")
            status = int(module.run(args, env))
            env.stdout.flush()  # here, so a reader that went away is met inside the boundary
            return status
    except KeyboardInterrupt:
        if debug:
            raise
        env.err(f"{prog}: interrupted")
        return ExitStatus.INTERRUPTED
    except BrokenPipeError:
        # the reader went away (``vblock map big.qed | head``): nothing more to say to it, and
        # the interpreter's own flush of stdout at exit must not complain either
        if env.stdout is sys.stdout:
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return ExitStatus.ERROR
    except (UsageError, VblockError, OSError, ValueError) as exc:
        if debug:
            raise
        env.err(f"{prog}: error: {_message(exc)}")
        return _error_status(exc, _verb_of(argv))
    except Exception as exc:
        if debug:
            raise
        env.err(
            f"{prog}: error: internal error: {type(exc).__name__}: {_message(exc)} "
            f"(run with --debug for the traceback)"
        )
        return _error_status(exc, _verb_of(argv))


def command():
    """The ``vblock`` console script (and ``python -m vblock``): ``main()``, then a quick exit.

    Once the verb has run and its output is flushed, nothing is left for the interpreter's own
    shutdown to do but tear down every module and object one by one, a visible part of every
    short command. When no other thread is alive the process
    ends at once instead (``os._exit``), after flushing the standard streams and the logging
    handlers; otherwise, or if a flush fails, it exits the ordinary way."""
    import threading

    status = main()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
    except (OSError, ValueError):
        sys.exit(status)
    if threading.active_count() == 1:
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    command()

"""``python -m vblock.bench host|block|qed|virtio|all [--json]``."""

import importlib
import sys

from vblock.bench import NAMES


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: python -m vblock.bench {{{'|'.join(NAMES)}|all}} [--json] [options]")
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    names = NAMES if name == "all" else (name,)
    for n in names:
        try:
            module = importlib.import_module(f"vblock.bench.{n}")
        except ModuleNotFoundError:
            print(
                f"unknown benchmark {n!r}: expected one of {', '.join(NAMES)} or all",
                file=sys.stderr,
            )
            return 2
        rc = module.main(rest)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())

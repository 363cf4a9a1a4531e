"""``vblock serve --vhost-user SOCKET IMAGE``: serve an image to a VM as a vhost-user-blk disk;
``vblock serve --nbd ADDRESS [--export-name NAME] [--shared N] IMAGE``: export it over NBD.

The VM side (QEMU; guest RAM must be shared memory)::

    qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
        -numa node,memdev=mem -chardev socket,id=c0,path=SOCKET \\
        -device vhost-user-blk-pci,chardev=c0,num-queues=N

NBD: ADDRESS is a unix socket path (anything containing ``/``) or ``HOST:PORT``; clients reach it
as ``nbd+unix:///NAME?socket=PATH`` or ``nbd://HOST:PORT/NAME`` (see ``vblock.nbd.server``).
``--shared N`` clients at once (default 1, 0 for no limit; more than one advertises multi-conn).

Runs until SIGTERM or SIGINT: then requests in flight finish, the image is flushed and closed
(a QED image's need-check flag is cleared) and the socket file is removed. Messages go to stderr:
with vhost-user, the device's counters (``VirtioBlk.stats``: one line per request type that was
seen) at exit and on SIGUSR1, and last a line that counts the flush requests the guest sent; with
NBD, last a line that counts the clients served.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

__all__ = ["add_parser", "run", "main", "stats_lines"]


def _on_off(value):
    if value not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"expected on or off, not {value!r}")
    return value == "on"


def _queues(value):
    n = int(value)
    if not 1 <= n <= 256:  # SET_VRING_KICK/CALL/ERR carry the ring index in 8 bits
        raise argparse.ArgumentTypeError(f"queues must be in 1..256, not {n}")
    return n


def _shared(value):
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"shared must be >= 0, not {n}")
    return n


def configure(p):
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument(
        "--vhost-user",
        metavar="SOCKET",
        help="unix socket path to listen on (a stale socket file is replaced)",
    )
    how.add_argument(
        "--nbd",
        metavar="ADDRESS",
        help="serve over NBD on a unix socket path (anything containing '/') or HOST:PORT",
    )
    p.add_argument("image", metavar="IMAGE", help="image file (or NBD URI) to serve")
    p.add_argument("--export-name", default="", metavar="NAME", help='NBD export name (default "")')
    p.add_argument(
        "--shared",
        type=_shared,
        default=1,
        metavar="N",
        help="NBD clients served at once (default 1; 0: no limit)",
    )
    p.add_argument(
        "-f",
        "--format",
        dest="fmt",
        metavar="FMT",
        default=None,
        help="image format (raw, qed, ...); probed when omitted",
    )
    p.add_argument("--read-only", action="store_true", help="serve read-only (VIRTIO_BLK_F_RO)")
    p.add_argument(
        "--queues", type=_queues, default=1, metavar="N", help="request queues (default 1)"
    )
    p.add_argument(
        "--serial", default="vblock0", metavar="S", help="serial number (GET_ID; 20 bytes max)"
    )
    p.add_argument(
        "--writeback",
        type=_on_off,
        default=True,
        metavar="on|off",
        help="report a volatile write cache (the guest then sends FLUSH; default on); "
        "off: the guest sees a write-through disk",
    )
    p.add_argument(
        "--cache",
        default="none",
        choices=("none", "writeback", "unsafe"),
        help="host cache mode for the image (default none: O_DIRECT)",
    )
    p.add_argument(
        "--aio",
        default="auto",
        choices=("auto", "io_uring", "threads"),
        help="host I/O engine (default auto: io_uring where the kernel allows; threads for --nbd)",
    )
    return p


def add_parser(sub, common=None):
    """Register ``serve`` on the ``vblock`` subparsers (``vblock.cli.main`` pattern)."""
    p = sub.add_parser(
        "serve",
        parents=[common] if common is not None else [],
        help="serve an image over vhost-user-blk or NBD",
        description="Serve an image to a VM as a vhost-user-blk disk, or over NBD, until SIGTERM or SIGINT.",
    )
    configure(p)
    return p


def _say(env, text):
    if env is not None:
        env.err(text)
    else:
        print(text, file=sys.stderr, flush=True)


def run(args, env=None):
    """Serve until SIGTERM/SIGINT. Returns the exit status (0). Raises ``OSError`` /
    ``ImageError`` for an image or socket that cannot be opened (the CLI boundary reports them)."""
    import vblock

    aio = args.aio
    if args.nbd is not None and aio == "auto" and not os.environ.get("VBLOCK_ENGINE"):
        # NBD replies are sent by the thread that completes the request: the thread engine's
        # workers send theirs side by side, where io_uring's one completion thread would send
        # every reply in turn.
        aio = "threads"
    img = vblock.open_image(
        args.image, format=args.fmt, read_only=args.read_only, cache=args.cache, aio=aio
    )
    if args.nbd is not None:
        return _run_nbd(args, env, img)
    from vblock.vhost_user.server import Server

    try:
        server = Server(
            args.vhost_user,
            img,
            num_queues=args.queues,
            serial=args.serial,
            read_only=args.read_only or None,
            writeback=args.writeback,
        )
    except BaseException:
        img.close()
        raise
    old = {}

    def on_signal(signum, _frame):
        server.stop()

    def report():
        for line in stats_lines(server.backend.device.stats()):
            _say(env, f"vblock serve: {line}")

    for s in (signal.SIGTERM, signal.SIGINT):
        old[s] = signal.signal(s, on_signal)
    old[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda _s, _f: server.call_soon(report))
    _say(env, f"vblock serve: {args.image} ({img.format}) on {args.vhost_user}")
    try:
        server.serve_forever()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        img.close()
    report()
    kicks = "/".join(str(k) for k in server.backend.kicks)
    _say(
        env,
        f"vblock serve: closed {args.image}: {server.backend.flushes} flushes, "
        f"{server.connections} connections, kicks per queue {kicks}",
    )
    return 0


def stats_lines(stats):
    """``VirtioBlk.stats()`` as text: one line per request type with requests, or one line
    saying there were none."""
    lines = []
    for kind, c in stats.items():
        if kind != "queues" and c["ops"]:
            lines.append(
                f"{kind}: {c['ops']} requests, {c['bytes']} bytes, {c['errors']} errors, "
                f"latency p50 {c['p50']} us, p99 {c['p99']} us, max {c['max']} us"
            )
    return lines or ["no requests served"]


def _run_nbd(args, env, img):
    from vblock.nbd.server import Server

    try:
        server = Server(
            args.nbd,
            img,
            export_name=args.export_name,
            read_only=args.read_only or None,
            shared=args.shared,
        )
    except BaseException:
        img.close()
        raise
    old = {
        s: signal.signal(s, lambda _n, _f: server.stop()) for s in (signal.SIGTERM, signal.SIGINT)
    }
    _say(
        env,
        f"vblock serve: {args.image} ({img.format}) on nbd {args.nbd}, export {args.export_name!r}",
    )
    try:
        server.serve_forever()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        img.close()
    _say(env, f"vblock serve: closed {args.image}: {server.connections} NBD clients served")
    return 0


def main(argv=None):
    """``python -m vblock.cli.serve`` (the same options as ``vblock serve``)."""
    logging.basicConfig(level=logging.WARNING, format="vblock serve: %(message)s")
    p = configure(argparse.ArgumentParser(prog="vblock serve"))
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

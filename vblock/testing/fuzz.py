"""Fuzz targets for what hostile input reaches: QED and qcow2 image files, virtqueue contents and
the bytes an NBD client sends.

Each target takes the fuzzer's bytes and must never raise anything but the documented errors;
any other exception, a hang, or a write where none is allowed is a finding.

* ``qed_image``: the input overlays the first bytes of a small valid QED image (header, backing
  name, L1 and L2 tables, data): open read-only, read everything and map it; open read-write
  (automatic repair when need-check is set), check, repair, check again. Allowed errors:
  ``ImageError`` (corruption named by field), ``UnsupportedError``, and ``OSError`` for a backing
  file that cannot be opened. The file must never grow past its starting length.
* ``qcow2_image``: the input's first byte picks a small valid qcow2 seed (4 KiB clusters with
  deflate-compressed, zero and data clusters over a raw backing file; or 16 KiB clusters with
  extended L2 and zstd), the rest overlays its first bytes: open read-only, read the first
  4 MiB, map, info and check it. A read-write open must be refused. Allowed errors as for
  ``qed_image``, and ``UnknownFormatError`` for a backing format no driver serves; the file
  must never change.
* ``virtqueue``: the input becomes a descriptor table, the available ring and the request headers
  of a virtio-blk queue over a RAM disk; the device must not raise, must not write guest memory
  outside the buffers the guest marked device-writable (and its used ring), and must end either
  serving or in DEVICE_NEEDS_RESET.
* ``nbd_server``: the input is what a client sends to ``vblock.nbd.protocol.ServerConnection``,
  from the greeting on (first byte even) or after a valid handshake with structured replies and
  ``base:allocation`` (odd), whole or in pieces. The only error allowed is ``RemoteProtocolError``;
  every command it lets through without an error lies inside the export and carries only flags
  valid for it, and every reply the server builds for it must encode.

Run ``python -m vblock.testing.fuzz TARGET [--seconds N] [--corpus DIR]``: coverage-guided with
atheris (libFuzzer) when it is installed, otherwise with hypothesis' random bytes. Exit status 0
means no finding; a finding prints the input (hex) and the exception and exits 1, and atheris also
saves the input as ``crash-*`` in the current directory. Keep every finding as a regression test.
"""

from __future__ import annotations

import argparse
import errno
import os
import struct
import sys
import tempfile
import time

TARGETS = ("qed_image", "virtqueue", "nbd_server", "qcow2_image")
#: the share of the bounded CI run (``VBLOCK_FUZZ_SECONDS``) each target gets (default 1.0)
BUDGET_SHARE = {"qcow2_image": 0.5}

# -- qed_image --------------------------------------------------------------------------------------

_QED_SEED_CACHE = {}


def qed_seed():
    """A small valid QED image (4 KiB clusters, table_size 1) with data, a zero cluster, two L2
    tables and a raw backing file named relatively; returns (directory, image bytes)."""
    if "seed" in _QED_SEED_CACHE:
        return _QED_SEED_CACHE["seed"]
    import vblock

    d = tempfile.mkdtemp(prefix="vblock-fuzz-seed-")
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.write(bytes([0x5A]) * 65536)
    path = os.path.join(d, "seed.qed")
    img = vblock.create_image(
        path,
        "qed",
        4 << 20,
        cluster_size=4096,
        table_size=1,
        backing_file="base.raw",
        backing_fmt="raw",
    )
    img.close()
    with vblock.open_image(path, format="qed") as img:
        img.write(0, b"\x11" * 4096)
        img.write(8192 + 512, b"\x22" * 1024)
        img.write_zeroes(16384, 4096)
        img.write((2 << 20) + 4096, b"\x33" * 8192)
    with open(path, "rb") as f:
        data = f.read()
    _QED_SEED_CACHE["seed"] = (d, data)
    return d, data


def _allowed_open_error(exc):
    from vblock.errors import ImageError, UnsupportedError

    if isinstance(exc, (ImageError, UnsupportedError)):
        return True
    # A backing file name that points nowhere useful (missing, a directory, no permission).
    return isinstance(exc, OSError) and exc.errno in (
        errno.ENOENT,
        errno.EISDIR,
        errno.EACCES,
        errno.ENOTDIR,
        errno.ENAMETOOLONG,
        errno.EINVAL,
        errno.ELOOP,
    )


def qed_image(data: bytes) -> None:
    import vblock

    seed_dir, seed = qed_seed()
    image = bytes(data[: len(seed)]) + seed[len(data) :]
    path = os.path.join(seed_dir, f"fuzz-{os.getpid()}.qed")
    with open(path, "wb") as f:
        f.write(image)
    start = len(image)
    try:
        for read_only in (True, False):
            try:
                img = vblock.open_image(
                    path, format="qed", read_only=read_only, cache="writeback", need_check_timeout=0
                )
            except Exception as exc:  # noqa: BLE001 - classified below
                if _allowed_open_error(exc):
                    continue
                raise
            with img:
                size = img.size
                for off in range(0, min(size, 4 << 20), 1 << 20):
                    try:
                        img.read(off, min(1 << 20, size - off))
                    except Exception as exc:  # noqa: BLE001
                        if not _allowed_open_error(exc):
                            raise
                try:
                    img.block_status(0, size)
                    if not read_only:
                        img.check(repair=True)
                        if size >= 8192:
                            img.write(4096, b"\x44" * 4096)
                    img.check()
                except Exception as exc:  # noqa: BLE001
                    if not _allowed_open_error(exc):
                        raise
        grown = os.path.getsize(path) - start
        # The one write above may allocate a data cluster and an L2 table; nothing else may grow.
        if grown > 2 * 4096 + 4096:
            raise AssertionError(f"image grew by {grown} bytes")
    finally:
        os.unlink(path)


# -- qcow2_image ------------------------------------------------------------------------------------

_QCOW2_SEEDS = {}


def qcow2_seeds():
    """Two small valid qcow2 images over one raw backing file; returns (directory, [bytes])."""
    if "seeds" in _QCOW2_SEEDS:
        return _QCOW2_SEEDS["seeds"]
    from vblock.testing.qcow2_image import ZERO, build

    d = tempfile.mkdtemp(prefix="vblock-fuzz-qcow2-")
    with open(os.path.join(d, "base.raw"), "wb") as f:
        f.write(bytes([0x5A]) * 65536)
    cs = 4096
    first = build(
        4 << 20,
        {
            0: b"\x11" * cs,
            1: ("compressed", b"\x22" * cs),
            2: ZERO,
            3: ("compressed", bytes(range(256)) * 16),
            600: b"\x33" * cs,
        },
        cluster_bits=12,
        backing="base.raw",
        backing_fmt="raw",
    ).data
    sc = 16384 // 32
    second = build(
        1 << 20,
        {
            0: ("sub", b"\x44" * 16384, 0xFFFF, 0xFF0000),
            1: ZERO,
            2: ("compressed", b"\x55" * 16384),
            40: b"\x66" * 16384,
        },
        cluster_bits=14,
        extended_l2=True,
        compression_type=1,
        backing="base.raw",
        backing_fmt="raw",
    ).data
    assert sc == 512
    _QCOW2_SEEDS["seeds"] = (d, [first, second])
    return _QCOW2_SEEDS["seeds"]


def _allowed_qcow2_error(exc):
    from vblock.errors import UnknownFormatError

    # a backing format name that no driver serves is the image's own words, not a finding
    return _allowed_open_error(exc) or isinstance(exc, UnknownFormatError)


def qcow2_image(data: bytes) -> None:
    import vblock

    seed_dir, seeds = qcow2_seeds()
    seed = seeds[data[0] % len(seeds)] if data else seeds[0]
    body = bytes(data[1:])
    image = body[: len(seed)] + seed[len(body) :]
    path = os.path.join(seed_dir, f"fuzz-{os.getpid()}.qcow2")
    with open(path, "wb") as f:
        f.write(image)
    try:
        try:
            img = vblock.open_image(path, format="qcow2", read_only=True, cache="writeback")
        except Exception as exc:  # noqa: BLE001 - classified below
            if _allowed_qcow2_error(exc):
                return
            raise
        with img:
            size = img.size
            for off in range(0, min(size, 4 << 20), 1 << 20):
                try:
                    img.read(off, min(1 << 20, size - off))
                except Exception as exc:  # noqa: BLE001
                    if not _allowed_qcow2_error(exc):
                        raise
            for fn in (lambda: img.driver.block_status(0, min(size, 1 << 30)), img.info, img.check):
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001
                    if not _allowed_qcow2_error(exc):
                        raise
        try:
            vblock.open_image(path, format="qcow2").close()
            raise AssertionError("a read-write open of a qcow2 image was not refused")
        except Exception as exc:  # noqa: BLE001
            if not _allowed_qcow2_error(exc):
                raise
        with open(path, "rb") as f:
            if f.read() != image:
                raise AssertionError("the qcow2 image changed")
    finally:
        os.unlink(path)


# -- virtqueue --------------------------------------------------------------------------------------

_VQ_MEM = 64 * 1024
_VQ_SIZE = 8


def virtqueue(data: bytes) -> None:
    import vblock
    from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
    from vblock.virtio import spec as S
    from vblock.virtio.driver import Driver

    img = vblock.open_image(None, format="memory", size=1 << 20)
    mem = GuestMemory.anonymous(_VQ_MEM)
    dev = VirtioBlk(img, mem, queue_size_max=_VQ_SIZE)
    drv = Driver(
        VirtioMmio(dev),
        mem,
        indirect=bool(data[:1] and data[0] & 1),
        event_idx=bool(data[:1] and data[0] & 2),
    )
    drv.start()
    dq = drv.queues[0]
    buf = drv.allocator.alloc(8192)  # the area descriptors may point into
    body = memoryview(data)[1:]
    table = bytes(body[: 16 * _VQ_SIZE]).ljust(16 * _VQ_SIZE, b"\0")
    rest = body[16 * _VQ_SIZE :]
    heads = bytes(rest[: 2 * _VQ_SIZE]).ljust(2 * _VQ_SIZE, b"\0")
    payload = bytes(rest[2 * _VQ_SIZE :])[:8192]
    mem.write(buf, payload)
    # Descriptor addresses are taken modulo a window around the buffer area, so most of them land
    # in guest memory (where parsing goes deepest) while the length and flags stay the fuzzer's.
    allowed = [(dq.used_addr, S.used_ring_bytes(dq.size))]
    for i in range(_VQ_SIZE):
        addr, length, flags, nxt = S.virtq_desc.unpack_from(table, 16 * i)
        if addr >> 63:
            addr = addr & ((1 << 64) - 1)  # keep hostile absolute addresses as they are
        else:
            addr = buf + addr % 9000
        dq.write_desc(i, addr, length, flags, nxt)
        if flags & S.VIRTQ_DESC_F_WRITE:
            allowed.append((addr, length))
        if flags & S.VIRTQ_DESC_F_INDIRECT and addr + length <= _VQ_MEM:
            # The writable entries of an indirect table are writable buffers too.
            for j in range(length // 16):
                iaddr, ilen, iflags, _ = S.virtq_desc.unpack_from(mem.read(addr + 16 * j, 16))
                if iflags & S.VIRTQ_DESC_F_WRITE:
                    allowed.append((iaddr, ilen))
    allowed.append((buf, 8192))  # the descriptor area itself
    count = heads[0] % (_VQ_SIZE + 2)
    for k in range(count):
        dq.push_head(heads[1 + k] % (_VQ_SIZE + 1) if k + 1 < len(heads) else 0, publish=False)
    jump = heads[-1] if heads[-1] > 250 else 0
    dq.set_avail_idx(dq.avail_idx + jump)
    before = mem.read(0, _VQ_MEM)
    dev.notify(0)
    if not dev.wait_idle(timeout=10):
        raise AssertionError("requests still in flight 10 s after the notification")
    after = mem.read(0, _VQ_MEM)
    if before != after:
        for i in range(_VQ_MEM):
            if before[i] != after[i] and not any(a <= i < a + n for a, n in allowed):
                raise AssertionError(
                    f"device wrote guest memory at {i:#x}, outside writable buffers"
                )
    img.close()


# -- nbd_server ----------------------------------------------------------------------------------

_NBD_SIZE = 1 << 20


def _nbd_handshake():
    """Client bytes of a valid handshake (structured replies, base:allocation, GO "disk")."""
    from vblock.nbd import protocol as P

    return (
        struct.pack(">I", P.FLAG_FIXED_NEWSTYLE | P.FLAG_NO_ZEROES)
        + P.encode_option(P.Opt.STRUCTURED_REPLY)
        + P.encode_option(
            P.Opt.SET_META_CONTEXT, P.encode_meta_request("disk", [P.BASE_ALLOCATION])
        )
        + P.encode_option(P.Opt.GO, P.encode_info_request("disk", (P.INFO_BLOCK_SIZE,)))
    )


def nbd_server(data: bytes) -> None:
    from vblock.nbd import protocol as P

    if not data:
        return
    mode, step, data = data[0], max(1, data[1] if len(data) > 1 else 1), data[2:]
    conn = P.ServerConnection([P.Export("disk", _NBD_SIZE, read_only=bool(mode & 2))])
    if mode & 1:
        data = _nbd_handshake() + data
    pieces = [data] if mode & 4 else [data[i : i + step] for i in range(0, len(data), step)]
    try:
        for piece in pieces + [b""]:
            conn.receive_data(piece)
            while True:
                ev = conn.next_event()
                conn.data_to_send()
                if ev is P.NEED_DATA or ev is P.CLOSED:
                    break
                if isinstance(ev, P.Command):
                    _check_nbd_command(conn, ev)
                    if ev.fatal:
                        return
    except P.RemoteProtocolError:
        if conn.state is not P.State.ERROR:
            raise AssertionError("a protocol error left the connection out of ERROR") from None


def _check_nbd_command(conn, cmd):
    from vblock.nbd import protocol as P

    if cmd.error:
        conn.reply(cmd, cmd.error, cmd.message)
        return
    if cmd.flags & ~P._VALID_FLAGS[cmd.kind]:
        raise AssertionError(f"flags {cmd.flags:#x} let through for {cmd.kind!r}")
    if cmd.kind != P.Cmd.FLUSH and cmd.offset + cmd.length > _NBD_SIZE:
        raise AssertionError(f"request [{cmd.offset}, +{cmd.length}) past the export let through")
    if cmd.kind == P.Cmd.WRITE and len(cmd.data) != cmd.length:
        raise AssertionError("WRITE payload of the wrong length")
    if cmd.kind == P.Cmd.READ:
        conn.reply_read(cmd, bytes(cmd.length))
    elif cmd.kind == P.Cmd.BLOCK_STATUS:
        conn.reply_block_status(cmd, [(cmd.length, 0)])
    else:
        conn.reply(cmd)


# -- runners ----------------------------------------------------------------------------------------


def _target(name):
    if name not in TARGETS:
        raise SystemExit(f"unknown fuzz target {name!r}: expected one of {', '.join(TARGETS)}")
    return globals()[name]


def seed_inputs(name):
    """Starting inputs: the valid seed image for qed_image, a well-formed request for virtqueue,
    a handshake and four requests for nbd_server."""
    if name == "qed_image":
        return [qed_seed()[1][: 4 * 4096]]
    if name == "qcow2_image":
        return [bytes([i]) + s[: 6 * 4096] for i, s in enumerate(qcow2_seeds()[1])]
    if name == "nbd_server":
        from vblock.nbd import protocol as P

        reqs = (
            P.encode_request(P.Cmd.WRITE, 1, 512, 4)
            + b"abcd"
            + P.encode_request(P.Cmd.READ, 2, 0, 512)
            + P.encode_request(P.Cmd.BLOCK_STATUS, 3, 0, 4096, P.CMD_FLAG_REQ_ONE)
            + P.encode_request(P.Cmd.DISC, 4)
        )
        return [bytes([1, 7]) + reqs, bytes([0, 3]) + _nbd_handshake() + reqs]
    return [bytes([3]) + bytes(16 * _VQ_SIZE) + bytes([1, 0]) + bytes(2 * _VQ_SIZE - 2)]


def run_hypothesis(name, seconds, seed=0):
    """Random and shrunk byte strings for ``seconds``; returns the number of executions."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    fn = _target(name)
    count = [0]
    end = time.monotonic() + seconds

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(
        st.one_of(
            st.binary(max_size=20000),
            st.builds(
                lambda s, pos, b: s[:pos] + b + s[pos + len(b) :],
                st.sampled_from(seed_inputs(name)),
                st.integers(0, 16384),
                st.binary(min_size=1, max_size=64),
            ),
        )
    )
    def run(data):
        count[0] += 1
        fn(data)

    for s in seed_inputs(name):
        fn(s)
    while time.monotonic() < end:
        run()
    return count[0]


def run_atheris(name, seconds, corpus=None):
    import atheris

    fn = _target(name)
    corpus = corpus or tempfile.mkdtemp(prefix=f"vblock-fuzz-{name}-")
    os.makedirs(corpus, exist_ok=True)
    for i, s in enumerate(seed_inputs(name)):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(s)
    args = [
        sys.argv[0],
        corpus,
        f"-max_total_time={int(seconds)}",
        "-max_len=20000",
        "-timeout=20",
        "-rss_limit_mb=4096",
        "-print_final_stats=1",
    ]
    atheris.Setup(args, fn)
    atheris.Fuzz()  # exits the process at the end of the run


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m vblock.testing.fuzz", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("target", choices=TARGETS)
    ap.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz (default 60)")
    ap.add_argument("--corpus", help="corpus directory (atheris)")
    ap.add_argument("--engine", choices=("auto", "atheris", "hypothesis"), default="auto")
    ap.add_argument(
        "--replay", nargs="*", help="run the target once on each of these files and exit"
    )
    args = ap.parse_args(argv)
    if args.replay is not None:
        fn = _target(args.target)
        for p in args.replay:
            with open(p, "rb") as f:
                fn(f.read())
        print(f"{len(args.replay)} inputs replayed without a finding")
        return 0
    engine = args.engine
    atheris = None
    if engine in ("auto", "atheris"):
        try:
            import atheris
        except ImportError:
            if engine == "atheris":
                raise
        engine = "atheris" if atheris is not None else "hypothesis"
    if engine == "atheris":
        with atheris.instrument_imports(include=["vblock"]):
            import vblock.block  # noqa: F401
            import vblock.drivers.qcow2  # noqa: F401
            import vblock.drivers.qed  # noqa: F401
            import vblock.nbd.protocol  # noqa: F401
            import vblock.virtio  # noqa: F401
        run_atheris(args.target, args.seconds, args.corpus)
        return 0
    n = run_hypothesis(args.target, args.seconds)
    print(f"{args.target}: {n} executions in {args.seconds:.0f} s without a finding (hypothesis)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m vblock.bench virtio``: the whole device path against the raw block layer.

8 KiB random writes at 1 and 16 requests in flight, O_DIRECT, through the guest-side driver ->
VirtioMmio -> VirtioBlk -> image, over a preallocated raw image and over a fully allocated QED
image (rewrites, no allocation). The peer of every row is the raw block layer itself
(``Image.submit_write`` on the same raw image, same pattern and depth), measured in the same run
in interleaved rounds, so the ratio is the cost of the virtio layer (and of QED, for the QED
rows).

The driver runs in the calling thread like a vCPU: it keeps ``depth`` requests posted in guest
buffers, kicks once per batch, sleeps on the interrupt, and reaps every completion it finds.

For emulators, two more rows per image at 16 in flight, over the raw image and over a memory
image (a RAM disk: no disk time, so the rows show what the Python path costs), each against its
own peer measured in the same rounds, in an order that rotates from round to round:
``virtio/<image> poll`` (``deliver="poll"``, the driver on a thread of its own that waits on
``dev.fileno()``, calls ``dev.poll()``, reaps and posts) against the callback mode, and
``virtio/<image> stats`` (counters on, the default) against ``stats=False``.
"""

from __future__ import annotations

import argparse
import itertools
import select
import shutil
import statistics
import threading
import time

import vblock
from vblock.bench import (
    OFFSETS_MASK,
    Row,
    bench_dir,
    closed_loop,
    drawn_offsets,
    pin_threads,
    preallocated_file,
    report,
)
from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
from vblock.virtio.driver import Driver
from vblock.virtio.spec import (
    VIRTIO_BLK_T_OUT,
    VIRTIO_MMIO_INTERRUPT_ACK,
    VIRTIO_MMIO_INTERRUPT_STATUS,
)

SIZE = 256 << 20
BS = 8192
DEPTHS = (1, 16)
EMULATOR_DEPTH = 16


def measure_block(img, depth, duration):
    """IOPS of ``depth`` 8 KiB random writes in flight straight on ``Image.submit_write``."""
    mem = GuestMemory.anonymous(depth * BS)
    bufs = [mem.view(i * BS, BS) for i in range(depth)]
    for b in bufs:
        b[:] = b"\xa5" * BS
    count, elapsed = closed_loop(
        lambda offset, slot: img.submit_write(offset, [bufs[slot]]),
        depth,
        duration,
        img.size // BS,
        BS,
    )
    return count / elapsed


def measure_virtio(img, depth, duration, seed=1, deliver="callback", stats=True):
    """IOPS of ``depth`` 8 KiB random writes in flight from the guest driver through the device.

    Interrupt-driven, like a guest whose completion handler restarts its queue: the interrupt
    callback (on whatever thread completes the request) reaps the used ring and posts the next
    requests at once, so no thread hand-off sits between a completion and the next submission
    (the peer, ``closed_loop``, does the same from the backend's completion callback).
    ``deliver="poll"``: see :func:`measure_virtio_poll`; ``stats``: as ``VirtioBlk``'s."""
    if deliver == "poll":
        return measure_virtio_poll(img, depth, duration, seed, stats)
    mem = GuestMemory.anonymous(16 << 20)
    dev = VirtioBlk(img, mem, queue_size_max=256, stats=stats)
    mmio = VirtioMmio(dev)
    drv = Driver(mmio, mem, event_idx=True, queue_size=256, interrupts=False).start()
    bufs = [drv.allocator.alloc(BS) for _ in range(depth)]
    for a in bufs:
        mem.write(a, b"\x5a" * BS)
    free = list(bufs)
    slot_of = {}
    nblocks = img.size // BS
    sectors = drawn_offsets(nblocks, BS // 512, seed)  # as closed_loop draws the peer's offsets
    counter = itertools.count()
    post_one, reap, kick = drv.post, drv.reap, drv.kick
    now = time.perf_counter
    lock = threading.Lock()
    state = {"count": 0, "pending": False, "error": None}
    finished = threading.Event()
    deadline = now() + duration

    def post():
        while free:
            a = free.pop()
            req = post_one(VIRTIO_BLK_T_OUT, sectors[next(counter) & OFFSETS_MASK], a, BS)
            slot_of[req] = a
        kick()

    def service():
        for req in reap():
            if req.status and state["error"] is None:
                state["error"] = RuntimeError(f"virtio write failed with status {req.status}")
            free.append(slot_of.pop(req))
            state["count"] += 1
        if now() < deadline and state["error"] is None:
            post()
        elif not slot_of:
            finished.set()

    def on_interrupt():
        isr = mmio.read(VIRTIO_MMIO_INTERRUPT_STATUS, 4)
        mmio.write(VIRTIO_MMIO_INTERRUPT_ACK, 4, isr)
        run_pending()

    def run_pending():
        state["pending"] = True
        while state["pending"]:
            if not lock.acquire(False):
                return  # the holder loops while pending
            try:
                while state["pending"]:
                    state["pending"] = False
                    service()
            finally:
                lock.release()

    mmio.interrupt = on_interrupt
    start = now()
    with lock:
        post()
    run_pending()  # interrupts that came while posting found the lock taken
    if not finished.wait(duration * 10 + 30):
        raise RuntimeError("virtio benchmark stalled")
    elapsed = now() - start
    if state["error"] is not None:
        raise state["error"]
    drv.reset()
    return state["count"] / elapsed


def measure_virtio_poll(img, depth, duration, seed=1, stats=True):
    """IOPS of ``depth`` 8 KiB random writes in flight through a ``deliver="poll"`` device, the
    driver on a thread of its own playing the emulator's loop: wait until ``dev.fileno()`` is
    readable, ``dev.poll()`` (used entries and the interrupt on this thread), reap, post, kick."""
    mem = GuestMemory.anonymous(16 << 20)
    dev = VirtioBlk(img, mem, queue_size_max=256, deliver="poll", stats=stats)
    mmio = VirtioMmio(dev)
    drv = Driver(mmio, mem, event_idx=True, queue_size=256, interrupts=False).start()
    bufs = [drv.allocator.alloc(BS) for _ in range(depth)]
    for a in bufs:
        mem.write(a, b"\x5a" * BS)
    nblocks = img.size // BS
    sectors = drawn_offsets(nblocks, BS // 512, seed)
    out = {}

    def loop():
        free = list(bufs)
        slot_of = {}
        counter = itertools.count()
        post_one, reap, kick, poll, fd = drv.post, drv.reap, drv.kick, dev.poll, dev.fileno()
        now = time.perf_counter
        count = 0
        start = now()
        deadline = start + duration
        while True:
            if now() < deadline:
                while free:
                    a = free.pop()
                    sector = sectors[next(counter) & OFFSETS_MASK]
                    slot_of[post_one(VIRTIO_BLK_T_OUT, sector, a, BS)] = a
                kick()
            elif not slot_of:
                break
            while not poll():
                if not select.select([fd], [], [], duration * 10 + 30)[0]:
                    raise RuntimeError("virtio poll benchmark stalled")
            for req in reap():
                if req.status:
                    raise RuntimeError(f"virtio write failed with status {req.status}")
                free.append(slot_of.pop(req))
                count += 1
        out["iops"] = count / (now() - start)

    def run_loop():
        try:
            loop()
        except BaseException as exc:  # raised in the caller's thread below
            out["error"] = exc

    t = threading.Thread(target=run_loop, name="vblock-bench-vcpu")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    drv.reset()
    dev.close()
    return out["iops"]


def measure_emulator(img, name, depth, duration, rounds, engine):
    """The two emulator rows of ``img`` (see the module docstring), from ``rounds`` rounds."""
    slice_ = duration / rounds
    cases = {
        "callback": lambda: measure_virtio(img, depth, slice_),
        "nostats": lambda: measure_virtio(img, depth, slice_, stats=False),
        "poll": lambda: measure_virtio(img, depth, slice_, deliver="poll"),
    }
    order = list(cases)
    got = {case: [] for case in cases}
    for r in range(rounds):
        for case in order[r % 3 :] + order[: r % 3]:  # no case always runs first
            got[case].append(cases[case]())
    rows = []
    pairs = (
        (f"virtio/{name} poll", "poll", "callback", f"virtio/{name} callback"),
        (f"virtio/{name} stats", "callback", "nostats", f"virtio/{name} no stats"),
    )
    for layer, case, peer, peer_name in pairs:
        iops = statistics.median(got[case])
        row = Row(layer, engine, "randwrite", BS, depth, iops, iops * BS / 1e6)
        row.against(peer_name, statistics.median(got[peer]))
        row.ratio = statistics.median(a / b for a, b in zip(got[case], got[peer]))
        rows.append(row)
    return rows


def fill(img, chunk=1 << 20):
    """Write every cluster once, so later writes are rewrites."""
    data = b"\x3c" * chunk
    for off in range(0, img.size, chunk):
        img.write(off, data)
    img.flush()


def run(duration=5.0, depths=DEPTHS, size=SIZE, qed=True, rounds=5, cpu=None, emulator=True):
    """Rows for every depth and image. Each case is measured in ``rounds`` interleaved rounds
    (peer, then each virtio case, ``duration / rounds`` seconds each); a row reports the median
    IOPS, and its ratio is the median of the per-round ratios, so a burst of load from other
    processes skews one round, not the result. ``cpu``: run every Python thread on that CPU
    (``pin_threads``; the rows say so), else wherever the scheduler puts them."""
    rows = []
    tmp = bench_dir()
    slice_ = duration / rounds
    try:
        raw_path = preallocated_file(tmp, size, "raw.img")
        raw = vblock.open_image(raw_path, format="raw", cache="none")
        images = [("raw", raw)]
        if qed:
            qed_path = f"{tmp}/alloc.qed"
            vblock.create_image(qed_path, "qed", size).close()
            q = vblock.open_image(qed_path, format="qed", cache="none")
            fill(q)
            images.append(("qed", q))
        try:
            engine = raw.info().get("engine", "?")
            if cpu is not None:
                pin_threads({cpu})
                engine += f", python on cpu {cpu}"
            for depth in depths:
                peers = []
                got = {name: [] for name, _ in images}
                for _ in range(rounds):
                    peer = measure_block(raw, depth, slice_)
                    peers.append(peer)
                    for name, img in images:
                        got[name].append((measure_virtio(img, depth, slice_), peer))
                for name, _ in images:
                    iops = statistics.median(v for v, _ in got[name])
                    row = Row(
                        f"virtio/{name}", engine, "randwrite", BS, depth, iops, iops * BS / 1e6
                    )
                    row.against("block raw", statistics.median(peers))
                    row.ratio = statistics.median(v / p for v, p in got[name])
                    rows.append(row)
            if emulator:
                rows.extend(measure_emulator(raw, "raw", EMULATOR_DEPTH, duration, rounds, engine))
                ram = vblock.create_image(None, "memory", size)
                try:
                    rows.extend(
                        measure_emulator(ram, "mem", EMULATOR_DEPTH, duration, rounds, engine)
                    )
                finally:
                    ram.close()
        finally:
            for _, img in images:
                img.close()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m vblock.bench virtio", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="one JSON object per row")
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per case (default 5)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds per case (default 5)")
    ap.add_argument("--no-qed", action="store_true", help="skip the QED rows")
    ap.add_argument(
        "--no-emulator", action="store_true", help="skip the poll-delivery and stats rows"
    )
    ap.add_argument(
        "--cpu",
        type=int,
        help="run every Python thread on this CPU (default: the scheduler decides)",
    )
    args = ap.parse_args(argv)
    rows = run(
        duration=args.duration,
        qed=not args.no_qed,
        rounds=max(1, args.rounds),
        cpu=args.cpu,
        emulator=not args.no_emulator,
    )
    report(rows, as_json=args.json)
    return 0

"""HostFile: both engines, alignment checks, errno preservation, fallback, concurrency, close."""

import errno
import os
import random
import stat
import subprocess
import sys
import threading

import pytest

from vblock.hostio import HostFile, alloc_buffer, buffers_aligned
from vblock.hostio import engine as engine_mod
from vblock.hostio._binding import ffi, lib

ENGINES = ["io_uring", "threads"]
FILE_SIZE = 4 << 20


@pytest.fixture
def image(scratch):
    path = scratch / "disk.img"
    with open(path, "wb") as f:
        f.truncate(FILE_SIZE)
    return str(path)


def _random_workload(f, seed, n_ops=300):
    """Apply a seeded mix of multi-buffer writes and reads through submit_* and the sync calls;
    returns the reference bytearray. Includes the file's last block."""
    rng = random.Random(seed)
    ref = bytearray(FILE_SIZE)
    blk = f.alignment if f.direct else 512
    futures = []
    for i in range(n_ops):
        nblocks = rng.randint(1, 16)
        if i == 0:
            offset = FILE_SIZE - blk  # the last block of the file
            nblocks = 1
        else:
            offset = rng.randrange(0, FILE_SIZE // blk - nblocks) * blk
        cuts = sorted(rng.sample(range(1, nblocks), k=min(nblocks - 1, rng.randint(0, 3))))
        sizes = [(b - a) * blk for a, b in zip([0] + cuts, cuts + [nblocks])]
        bufs = []
        for size in sizes:
            b = f.alloc(size)
            b[:] = rng.randbytes(size)
            bufs.append(b)
        data = b"".join(bytes(b) for b in bufs)
        # In-flight requests carry no order: finish reads that this write overlaps first.
        end = offset + len(data)
        for pending in [p for p in futures if p[0] < end and offset < p[0] + len(p[3])]:
            _check_read(*pending)
            futures.remove(pending)
        if rng.random() < 0.5:
            assert f.submit_write(offset, bufs).result(timeout=30) == len(data)
        else:
            assert f.pwritev(bufs, offset) == len(data)
        ref[offset : offset + len(data)] = data
        if rng.random() < 0.3:
            rd = [f.alloc(s) for s in sizes]
            futures.append(
                (offset, rd, f.submit_read(offset, rd), bytes(ref[offset : offset + len(data)]))
            )
    for pending in futures:
        _check_read(*pending)
    return ref


def _check_read(offset, rd, fut, expect):
    assert fut.result(timeout=30) == len(expect)
    assert b"".join(bytes(b) for b in rd) == expect


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("direct", [True, False])
def test_engines_match_reference(image, engine, direct):
    with HostFile(image, direct=direct, engine=engine) as f:
        assert f.engine == engine
        ref = _random_workload(f, seed=1234)
        f.flush()
        whole = f.alloc(FILE_SIZE)
        assert f.pread(whole, 0) == FILE_SIZE
        assert bytes(whole) == bytes(ref)
    with open(image, "rb") as raw:
        assert raw.read() == bytes(ref)


def test_both_engines_write_identical_files(scratch):
    outputs = []
    for engine in ENGINES:
        path = scratch / f"{engine}.img"
        with open(path, "wb") as fh:
            fh.truncate(FILE_SIZE)
        with HostFile(str(path), engine=engine) as f:
            _random_workload(f, seed=99)
        outputs.append(path.read_bytes())
    assert outputs[0] == outputs[1]


@pytest.mark.parametrize("engine", ENGINES)
def test_misaligned_requests_raise_before_io(image, engine):
    with HostFile(image, direct=True, engine=engine) as f:
        a = f.alignment
        good = f.alloc(a)
        with pytest.raises(ValueError, match=r"offset 1 is not a multiple .*alignment " + str(a)):
            f.submit_write(1, [good])
        with pytest.raises(ValueError, match="length"):
            f.pwrite(f.alloc(a + 1), 0)
        unaligned = memoryview(alloc_buffer(2 * a + 4096))[1 : 1 + a]
        with pytest.raises(ValueError, match="address"):
            f.submit_read(0, [unaligned])
        assert f.inflight() == 0


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("count", [3, 16])  # in a slot's own iovecs, and in an array of its own
def test_misaligned_buffer_of_a_scattered_request_is_named(image, engine, count):
    """A request of many buffers (a guest's scattered pages) is checked buffer by buffer in the
    shim; the error names the first bad one, nothing is submitted, and the slot serves the next
    request."""
    with HostFile(image, direct=True, engine=engine) as f:
        a = f.alignment
        big = f.alloc((count + 2) * 2 * a)
        pages = [big[2 * i * a : 2 * i * a + a] for i in range(count)]
        for i, p in enumerate(pages):
            p[:] = bytes([i + 1]) * a
        shifted = pages[: count - 1] + [big[1 : 1 + a]]
        with pytest.raises(ValueError, match=f"buffer {count - 1} address"):
            f.submit_write(0, shifted)
        odd = pages[:1] + [pages[1][: a // 2]] + pages[2:]
        with pytest.raises(ValueError, match=f"length {a // 2} of buffer 1"):
            f.submit_write(0, odd)
        with pytest.raises(ValueError, match="offset 1 is not a multiple"):
            f.submit_write(1, pages)
        with pytest.raises(ValueError, match="offset 1 is not a multiple"):
            f.submit_write(1, [])
        with pytest.raises(ValueError, match="negative offset -4096"):
            f.submit_write(-4096, pages)
        assert f.inflight() == 0
        assert f.submit_write(0, []).result(timeout=10) == 0  # nothing to move
        assert f.submit_write(0, pages).result(timeout=10) == count * a
        back = [f.alloc(a) for _ in range(count)]
        assert f.submit_read(0, back).result(timeout=10) == count * a
        assert [bytes(b) for b in back] == [bytes([i + 1]) * a for i in range(count)]


def test_buffers_aligned_checks_every_length_and_address():
    big = alloc_buffer(64 * 4096)
    pages = [big[i * 8192 : i * 8192 + 4096] for i in range(8)]
    assert buffers_aligned(pages, 4096, 4096)
    assert not buffers_aligned(
        pages[:7] + [big[-4096 - 512 : -512]], 4096, 4096
    )  # address 512 off a page
    assert buffers_aligned(pages[:7] + [big[-4096 - 512 : -512]], 512, 512)
    assert not buffers_aligned(pages[:3] + [pages[3][:2048]] + pages[4:], 4096, 1)  # a short length
    assert buffers_aligned([], 4096, 4096)


def test_unsubmitted_scattered_request_gives_its_slot_back_whole(image):
    """A request of more buffers than a slot holds carries an iovec array of its own; when the
    engine refuses it (closed under a batch), the slot gets its own iovecs back, so the next
    request filled into it does not write through the dropped array."""
    from vblock.hostio.engine import INLINE_IOVS, Engine

    eng = Engine("io_uring", image)
    bufs = [ffi.from_buffer(alloc_buffer(4096)) for _ in range(INLINE_IOVS + 2)]
    eng.begin_batch()
    fut = eng.submitv(True, 0, 0, bufs, 1, 1)
    tok = eng._local.batch[0]
    assert eng._ops[tok].iov != eng._iov[tok]
    eng.close()
    eng.end_batch()
    with pytest.raises(OSError) as exc:
        fut.result(timeout=10)
    assert exc.value.errno == errno.EBADF
    assert eng._ops[tok].iov == eng._iov[tok]


@pytest.mark.parametrize("engine", ENGINES)
def test_read_past_eof_reports_short_count(image, engine):
    with HostFile(image, direct=True, engine=engine) as f:
        buf = f.alloc(8192)
        assert f.pread(buf, FILE_SIZE - 4096) == 4096  # documented: short count at end of file
        assert f.submit_read(FILE_SIZE, [buf]).result(timeout=10) == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_write_through_read_only_open_keeps_ebadf(image, engine):
    with HostFile(image, direct=True, engine=engine, read_only=True) as f:
        buf = f.alloc(4096)
        with pytest.raises(OSError) as sync:
            f.pwrite(buf, 8192)
        fut = f.submit_write(12288, [buf])
        with pytest.raises(OSError) as async_:
            fut.result(timeout=10)
    for exc, offset in ((sync.value, 8192), (async_.value, 12288)):
        assert exc.errno == errno.EBADF
        assert image in str(exc) and f"offset {offset}" in str(exc)


@pytest.mark.parametrize("engine", ENGINES)
def test_fallocate_unsupported_keeps_errno(engine):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm (tmpfs) to try an unsupported fallocate mode on")
    path = f"/dev/shm/vblock-test-{os.getpid()}-{engine}"
    with open(path, "wb") as fh:
        fh.truncate(1 << 20)
    try:
        with HostFile(path, direct=False, engine=engine) as f:
            with pytest.raises(OSError) as exc:
                f.zero_range(4096, 4096)  # tmpfs has no FALLOC_FL_ZERO_RANGE
            assert exc.value.errno == errno.EOPNOTSUPP
            assert "offset 4096" in str(exc.value) and path in str(exc.value)
            with pytest.raises(OSError) as exc2:
                f.submit_zero_range(8192, 4096).result(timeout=10)
            assert exc2.value.errno == errno.EOPNOTSUPP
    finally:
        os.unlink(path)


def test_file_system_refusing_direct_gives_clear_error():
    # procfs refuses O_DIRECT (recent tmpfs accepts it, so it cannot serve here).
    path = "/proc/version"
    with pytest.raises(OSError, match="refuses O_DIRECT") as exc:
        HostFile(path, direct=True, read_only=True)
    assert exc.value.errno == errno.EINVAL and path in str(exc.value)
    with HostFile(path, direct="try", read_only=True) as f:
        assert f.direct is False and f.alignment == 1
        buf = bytearray(5)
        assert f.pread(buf, 0) == 5 and bytes(buf) == b"Linux"


@pytest.mark.parametrize("engine", ENGINES)
def test_closed_file_raises_ebadf(image, engine):
    f = HostFile(image, engine=engine)
    buf = f.alloc(4096)
    f.close()
    f.close()  # idempotent
    for call in (lambda: f.pwrite(buf, 4096), lambda: f.submit_write(4096, [buf]), f.flush):
        with pytest.raises(OSError) as exc:
            call()
        assert exc.value.errno == errno.EBADF and image in str(exc.value)


@pytest.mark.parametrize("direct", [False, True])
def test_start_writeback(image, direct):
    """Starts the page cache's writeback of the range and returns at once; nothing to do for
    O_DIRECT; the usual argument and closed-file errors."""
    with HostFile(image, direct=direct) as f:
        buf = f.alloc(65536)
        buf[:] = b"\x3c" * 65536
        f.pwrite(buf, 0)
        assert f.start_writeback() is None
        assert f.start_writeback(4096, 8192) is None
        with pytest.raises(ValueError, match="negative"):
            f.start_writeback(-1, 0)
        rd = f.alloc(65536)
        f.pread(rd, 0)
        assert bytes(rd) == b"\x3c" * 65536
    # the shim really asks the kernel (sync_file_range), which checks its arguments
    from vblock.hostio._binding import lib

    assert lib.vbio_start_writeback(-1, 0, 0) == -errno.EBADF
    fd = os.open(image, os.O_RDONLY)
    try:
        assert lib.vbio_start_writeback(fd, 0, 1 << 63) == -errno.EINVAL  # a negative length
    finally:
        os.close(fd)
    with pytest.raises(OSError) as exc:
        f.start_writeback()
    assert exc.value.errno == errno.EBADF and image in str(exc.value)


@pytest.mark.parametrize("engine", ENGINES)
def test_discard_truncate_seek(image, engine):
    with HostFile(image, engine=engine) as f:
        buf = f.alloc(65536)
        buf[:] = b"\x5a" * 65536
        f.pwrite(buf, 1 << 20)
        f.flush()
        assert f.seek_data(0) == 1 << 20
        f.discard(1 << 20, 65536)
        rd = f.alloc(65536)
        f.pread(rd, 1 << 20)
        assert bytes(rd) == bytes(65536)
        assert f.seek_data(0) is None
        f.pwrite(buf, 0)
        assert (f.seek_data(0), f.seek_hole(0)) == (0, 65536)
        f.truncate(8192)
        assert f.size == 8192
        assert f.seek_hole(0) == 8192  # the end of the file counts as a hole


def test_allocate_gives_blocks_that_read_zeros_and_grows_the_file(image):
    with HostFile(image) as f:
        size = f.size
        blocks = os.stat(image).st_blocks
        f.allocate(size, 4 << 20)
        assert f.size == size + (4 << 20)
        assert (os.stat(image).st_blocks - blocks) * 512 >= 4 << 20  # blocks, not a hole
        rd = f.alloc(65536)
        rd[:] = b"\xff" * 65536
        assert f.pread(rd, size + (1 << 20)) == 65536 and bytes(rd) == bytes(65536)
        f.allocate(0, 4096)  # inside the file: the size stays
        assert f.size == size + (4 << 20)
        with pytest.raises(ValueError):
            f.allocate(-1, 4096)
    with pytest.raises(OSError) as exc:
        f.allocate(0, 4096)
    assert exc.value.errno == errno.EBADF


def test_env_selects_thread_engine(image, monkeypatch):
    monkeypatch.setenv("VBLOCK_ENGINE", "threads")
    with HostFile(image, engine="auto") as f:
        assert f.engine == "threads"
        _random_workload(f, seed=5, n_ops=50)


def test_injected_uring_setup_failure_falls_back(image):
    lib.vbio_debug_fail_uring_setup(errno.EPERM)
    engine_mod._reset_probe()
    try:
        with HostFile(image, engine="auto") as f:
            assert f.engine == "threads"
            _random_workload(f, seed=6, n_ops=50)
        with pytest.raises(OSError) as exc:
            HostFile(image, engine="io_uring")
        assert exc.value.errno == errno.EPERM
    finally:
        lib.vbio_debug_fail_uring_setup(0)
        engine_mod._reset_probe()


@pytest.mark.parametrize("engine", ENGINES)
def test_many_threads_every_completion_once(image, engine):
    """8 threads x 1000 random requests on one file: each future completes once, with its result."""
    blk = 4096
    nblocks = FILE_SIZE // blk
    completions = [0] * (8 * 1000)
    lock = threading.Lock()
    errors = []

    def worker(tid):
        rng = random.Random(tid)
        buf = alloc_buffer(blk)
        buf[:] = bytes([tid]) * blk
        futs = []
        for i in range(1000):
            key = tid * 1000 + i
            block = tid * (nblocks // 8) + rng.randrange(nblocks // 8)  # each thread its own area
            if rng.random() < 0.5:
                fut = f.submit_write(block * blk, [buf])
            else:
                fut = f.submit_read(block * blk, [alloc_buffer(blk)])

            def done(fu, key=key):
                with lock:
                    completions[key] += 1
                if fu.exception() is not None or fu.result() != blk:
                    errors.append((key, fu))

            fut.add_done_callback(done)
            futs.append(fut)
        for fut in futs:
            fut.result(timeout=60)

    with HostFile(image, engine=engine) as f:
        threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == []
    assert completions == [1] * 8000


def test_gil_released_while_shim_waits(scratch):
    """A read from a FIFO stays pending in the kernel; a Python counter runs meanwhile."""
    fifo = str(scratch / "fifo")
    os.mkfifo(fifo)
    with HostFile(fifo, direct=False, engine="io_uring") as f:
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        buf = bytearray(5)
        fut = f.submit_read(0, [buf])
        counter = [0]
        reached = threading.Event()

        def count():
            while counter[0] < 200_000:
                counter[0] += 1
            reached.set()

        t = threading.Thread(target=count)
        t.start()
        assert reached.wait(timeout=30)  # the reaper sits in io_uring_enter without the GIL
        t.join()
        assert not fut.done()
        # Feed the FIFO through our own descriptor to finish the request.
        writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"hello")
        os.close(writer)
        assert fut.result(timeout=10) == 5
        assert bytes(buf) == b"hello"


@pytest.mark.parametrize("engine", ENGINES)
def test_close_with_requests_in_flight(image, engine):
    f = HostFile(image, engine=engine)
    buf = f.alloc(65536)
    futs = [f.submit_write((i % 64) * 65536, [buf]) for i in range(500)]
    f.close()  # waits for them
    assert all(fu.done() for fu in futs)
    assert all(fu.result() == 65536 for fu in futs)
    with pytest.raises(OSError) as exc:
        f.submit_write(0, [buf])
    assert exc.value.errno == errno.EBADF


_LEFT_OPEN = """
import sys
from vblock.hostio import HostFile
f = HostFile(sys.argv[1], engine=sys.argv[2])
buf = f.alloc(65536)
buf[:] = b"\\x5a" * 65536
f.submit_write(0, [buf]).result()
futs = [f.submit_write(i * 65536, [buf]) for i in range(1, 64)]  # still in flight at exit
"""


@pytest.mark.parametrize("engine", ENGINES)
def test_a_file_left_open_at_exit_finishes_its_requests(image, engine):
    """A script that exits with a HostFile open and writes in flight: the interpreter exits cleanly
    (an engine freed during finalization under its completion thread used to crash it, about one
    run in three) and every write it submitted is in the file."""
    for _ in range(8):
        os.truncate(image, 0)
        os.truncate(image, FILE_SIZE)
        r = subprocess.run(
            [sys.executable, "-c", _LEFT_OPEN, image, engine], capture_output=True, timeout=60
        )
        assert r.returncode == 0, r.stderr.decode()[-2000:]
        with open(image, "rb") as f:
            assert f.read(64 * 65536) == b"\x5a" * (64 * 65536)


@pytest.mark.parametrize("engine", ENGINES)
def test_batch_submits_together(image, engine):
    with HostFile(image, engine=engine) as f:
        bufs = [f.alloc(4096) for _ in range(32)]
        for i, b in enumerate(bufs):
            b[:] = bytes([i]) * 4096
        with f.batch():
            futs = [f.submit_write(i * 4096, [b]) for i, b in enumerate(bufs)]
            assert f.inflight() == 0  # nothing reached the kernel yet
        assert [fu.result(timeout=10) for fu in futs] == [4096] * 32
        rd = f.alloc(32 * 4096)
        f.pread(rd, 0)
        assert bytes(rd) == b"".join(bytes([i]) * 4096 for i in range(32))


@pytest.mark.parametrize("engine", ENGINES)
def test_push_submits_what_a_batch_collected_so_far(image, engine):
    with HostFile(image, engine=engine) as f:
        first, second = f.alloc(4096), f.alloc(4096)
        first[:] = b"\x11" * 4096
        second[:] = b"\x22" * 4096
        with f.batch():
            fut = f.submit_write(0, [first])
            f.push()  # without it, waiting here would wait for the end of the batch: forever
            assert fut.result(timeout=10) == 4096
            later = f.submit_write(4096, [second])
            assert f.inflight() == 0 and not later.done()  # still collecting after the push
        assert later.result(timeout=10) == 4096
        f.push()  # outside a batch: nothing to do
        rd = f.alloc(8192)
        f.pread(rd, 0)
        assert bytes(rd) == b"\x11" * 4096 + b"\x22" * 4096


def _chained_writes(f, depth, total, blk=4096):
    """Keep ``depth`` writes in flight, each completion submitting the next one from the engine's
    own thread (a closed loop, as the benchmarks run it), then a burst of single requests; returns
    the reference contents of the first ``total`` blocks."""
    bufs = [f.alloc(blk) for _ in range(total)]
    for i, b in enumerate(bufs):
        b[:] = i.to_bytes(4, "little") * (blk // 4)
    state = {"next": depth, "done": 0, "error": None}
    lock = threading.Lock()
    finished = threading.Event()

    def done(fu):
        with lock:
            state["done"] += 1
            if fu.exception() is not None and state["error"] is None:
                state["error"] = fu.exception()
            i = state["next"]
            state["next"] += 1
            last = state["done"] == total
        if i < total:
            f.submit_write(i * blk, [bufs[i]]).add_done_callback(done)
        if last:
            finished.set()

    for i in range(depth):
        f.submit_write(i * blk, [bufs[i]]).add_done_callback(done)
    assert finished.wait(timeout=60)
    assert state["error"] is None
    for i in range(0, total, 7):  # one at a time: the depth falls back under any threshold
        assert f.submit_write(i * blk, [bufs[i]]).result(timeout=30) == blk
    return b"".join(bytes(b) for b in bufs)


@pytest.mark.parametrize("spin_us", ["0", "1", "100000"])
@pytest.mark.parametrize("poll_depth", ["0", "1", "4"])
def test_uring_polled_ring_keeps_every_byte(image, poll_depth, spin_us, monkeypatch):
    """The io_uring engine moves between its ordinary and its SQPOLL ring as the depth crosses
    VBLOCK_POLL_DEPTH (0: never, 1: almost always), and its completion thread sleeps at once, spins
    a microsecond at most (almost every spin misses), or spins up to 100 ms (every completion is
    caught spinning): mixed sync/async work, a deep closed loop and single requests all land, and
    every completion arrives."""
    monkeypatch.setenv("VBLOCK_POLL_DEPTH", poll_depth)
    monkeypatch.setenv("VBLOCK_SPIN_US", spin_us)
    with HostFile(image, engine="io_uring") as f:
        ref = _random_workload(f, seed=7, n_ops=150)
        chained = _chained_writes(f, depth=32, total=512)
        assert f.inflight() == 0
    with open(image, "rb") as raw:
        data = raw.read()
    assert data[: len(chained)] == chained
    assert data[len(chained) :] == bytes(ref[len(chained) :])


@pytest.mark.parametrize("spin_us", ["0", "100"])
def test_uring_low_depth_never_wakes_through_the_polled_ring(image, spin_us, monkeypatch):
    """One request at a time stays on the ordinary ring, and so does the completion thread's wait:
    no submission has to wake it through the polled ring (when it waited there on a tie, every
    request sent a NOP through the SQPOLL ring and kept its kernel thread spinning on a core)."""
    monkeypatch.setenv("VBLOCK_POLL_DEPTH", "4")
    monkeypatch.setenv("VBLOCK_SPIN_US", spin_us)
    with HostFile(image, engine="io_uring") as f:
        buf = f.alloc(4096)
        for i in range(300):
            assert f.submit_write((i % 64) * 4096, [buf]).result(timeout=30) == 4096
        assert f._engine.cross_wakes() == 0


@pytest.mark.parametrize("name", ["VBLOCK_POLL_DEPTH", "VBLOCK_SPIN_US"])
def test_engine_env_settings_must_be_numbers(image, monkeypatch, name):
    monkeypatch.setenv(name, "deep")
    with pytest.raises(ValueError, match=name):
        HostFile(image, engine="io_uring")


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_thread_engine_workers_deliver_closed_loop(image, workers):
    """The thread engine's workers complete futures themselves, one at a time, and run what the
    callbacks submit: a closed loop deeper than the pool still finishes with every byte, and
    closing stops every worker."""
    f = HostFile(image, engine="threads", threads=workers)
    chained = _chained_writes(f, depth=24, total=300)
    engine = f._engine
    f.close()
    assert not any(t.is_alive() for t in engine._threads)
    assert len(engine._threads) == workers
    with open(image, "rb") as raw:
        assert raw.read(len(chained)) == chained


def _callback_cpus(f, depth):
    """Submit ``depth`` writes at once; for each completion, in order: (worker index, the CPUs its
    thread may run on while it runs the callback)."""
    seen = []
    index = {t.native_id: i for i, t in enumerate(f._engine._threads)}
    buf = f.alloc(4096)

    def note(_):
        seen.append((index[threading.get_native_id()], os.sched_getaffinity(0)))

    with f.batch():  # callbacks attached before the batch goes out: none runs on this thread
        futs = [f.submit_write(4096 * i, [buf]) for i in range(depth)]
        for fut in futs:
            fut.add_done_callback(note)
    for fut in futs:
        fut.result()
    assert len(seen) == depth
    return seen


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_thread_engine_workers_keep_to_their_cpu_only_while_many_requests_are_in_flight(image):
    cpus = sorted(os.sched_getaffinity(0))
    with HostFile(image, engine="threads", threads=16) as f:
        for _ in range(3):
            first = _callback_cpus(f, 16)[0]  # delivered with 15 more in flight
            worker, allowed = first
            assert allowed == {cpus[worker % len(cpus)]}
            alone = _callback_cpus(f, 1)[0]  # one in flight: the worker floats again
            assert alone[1] == set(cpus)
    assert os.sched_getaffinity(0) == set(cpus)  # the opening thread keeps its own set


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_later_pin_of_the_whole_process_wins_over_spreading(image):
    from vblock.bench import pin_threads

    full = os.sched_getaffinity(0)
    last = max(full)
    with HostFile(image, engine="threads", threads=4) as f:
        try:
            pin_threads({last})  # as `vblock bench virtio --cpu`, or taskset -a, after the open
            for depth in (16, 1, 16):
                assert all(cpus == {last} for _, cpus in _callback_cpus(f, depth))
        finally:
            pin_threads(full)


def test_spreading_workers_can_be_turned_off(image, monkeypatch):
    monkeypatch.setenv("VBLOCK_SPREAD_WORKERS", "0")
    assert engine_mod.worker_cpus() == []
    allowed = os.sched_getaffinity(0)
    with HostFile(image, engine="threads", threads=4) as f:
        assert all(cpus == allowed for _, cpus in _callback_cpus(f, 16))


def test_one_cpu_leaves_workers_floating(monkeypatch):
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert engine_mod.worker_cpus() == []
    finally:
        os.sched_setaffinity(0, before)


def test_thread_engine_open_close_never_hangs(image):
    """Closing races with workers that are about to sleep or still looking for work: every close
    returns (a missed stop wake-up would hang here until the test's timeout)."""
    for i in range(300):
        with HostFile(image, engine="threads", threads=1 + i % 4) as f:
            buf = f.alloc(4096)
            futs = [f.submit_read((i * 7 + k) % 64 * 4096, [buf]) for k in range(i % 3)]
        assert all(fu.result() == 4096 for fu in futs)

"""The stress run: verified random I/O through virtio-blk queues, the way a guest would drive them.

Theory of operation
-------------------
One guest thread drives ``queues`` virtqueues of a ``VirtioBlk`` (through ``VirtioMmio`` and the
test driver ``vblock.virtio.driver``) over an image, keeping ``depth`` requests in flight on each:
reads, writes, flushes, discards and write-zeroes at random 4 KiB-aligned places (a fifth of them
in a small hot region, so requests in flight overlap often). Completions arrive in any order.

Every sector a write carries is *stamped*: a 32-byte header (magic, run id, the sector's own byte
offset, the write's generation, a CRC32 over the header and the rest of the sector) followed by
480 bytes picked by the generation. A sector read back is therefore one of: a valid stamp (which
names its generation), zeros, or something impossible (wrong offset, stale run, bad checksum,
garbage).

The model knows, for every 4 KiB block, which values it may hold (generations, and 0 for zeros):

* a write, write-zeroes or discard registers with every block it covers while in flight; requests
  in flight on the same block at the same time record each other's values (*concurrent*);
* when a write of value v completes, a block may hold v or the value of any write whose lifetime
  overlapped v's (it may have landed after v); nothing older survives;
* a discard may leave the old data or zeros: on completion, the old possibilities stay and 0 joins;
* a read may see what was possible when it was issued, plus every value written to the block by a
  request in flight at any moment of its own lifetime.

Overlapping requests promise no order between them (virtio, QEMU, ``vblock.block``), so that set
is exactly what a correct device may return, sector by sector. Any other sector is a *mismatch*,
reported with its byte offset. After the timed phase the run drains, flushes, closes the image,
reopens it, re-reads every block it touched (checking the model again: flushed data must survive a
reopen) and runs the image's own check. ``StressReport.ok`` is false on any mismatch, failed
request or unclean check.

A failed request is reported with its virtio status and the cause the block layer gave the device
(the host's errno name for an ``OSError``: ENOSPC, EIO...), which the status alone cannot carry.
A given ``image`` must exist: the run never creates one there.
"""

from __future__ import annotations

import collections
import dataclasses
import errno
import os
import random
import shutil
import struct
import tempfile
import threading
import time
import zlib

import vblock
from vblock.hostio import alloc_buffer
from vblock.nbd.uri import is_nbd_uri
from vblock.virtio import GuestMemory, VirtioBlk, VirtioMmio
from vblock.virtio import spec as S
from vblock.virtio.driver import Driver, encode_segments

__all__ = ["StressConfig", "StressReport", "Mismatch", "run", "stamp", "DEFAULT_DURATION"]

SECTOR = 512
BLOCK = 4096  # bytes: requests are multiples of this, aligned to it; the model's unit
SECTORS_PER_BLOCK = BLOCK // SECTOR
MAGIC = 0x54534256  # b"VBST" little-endian
_HDR = struct.Struct("<IIQQ")  # magic, run id, byte offset of this sector, generation
_CRC = struct.Struct("<I")
_STAMP = struct.Struct("<IIQQI")  # the header with its CRC (bytes 0..28 of the sector)
HEADER_BYTES = 32
BODY_BYTES = SECTOR - HEADER_BYTES
_POOL_BYTES = 1 << 16
ZERO = 0  # the model's value for "reads as zeros"
UNKNOWN = -1  # the model's value for "never written by this run, on an image we did not create"
_ZERO_SECTOR = bytes(SECTOR)
_ZERO_BLOCK = bytes(BLOCK)

DEFAULT_DURATION = 15.0  # seconds of random I/O; reopen, re-read, check and clean-up follow
SIZES_BLOCKS = (1, 1, 1, 2, 2, 4, 8, 16)  # request sizes in blocks (4 KiB .. 64 KiB)
HOT_BLOCKS = 256  # the first 1 MiB of the disk takes a fifth of the requests
SWEEP_BYTES = 1 << 20  # bytes per read in the final sweep
SWEEP_DEPTH = 16

IN, OUT, FLUSH = S.VIRTIO_BLK_T_IN, S.VIRTIO_BLK_T_OUT, S.VIRTIO_BLK_T_FLUSH
DISCARD, WZ = S.VIRTIO_BLK_T_DISCARD, S.VIRTIO_BLK_T_WRITE_ZEROES
OP_NAMES = {IN: "read", OUT: "write", FLUSH: "flush", DISCARD: "discard", WZ: "write-zeroes"}


@dataclasses.dataclass
class StressConfig:
    duration: float = DEFAULT_DURATION  # seconds of random I/O
    queues: int = 4
    depth: int = 16  # requests in flight per queue
    size: int = 256 << 20  # bytes: virtual size of a created image
    image: str | None = None  # None: a QED image in a temporary directory
    format: str | None = None  # None: qed for created images, probe for existing ones
    seed: int | None = None  # None: chosen from the clock (reported)
    keep: bool = False  # keep the temporary directory
    workdir: str | None = (
        None  # where the temporary directory goes (default: $VBLOCK_STRESS_DIR, /var/tmp)
    )
    mix: tuple = (0.45, 0.40, 0.06, 0.06, 0.03)  # read, write, write-zeroes, discard, flush


@dataclasses.dataclass
class Mismatch:
    offset: int  # byte offset of the sector in the guest disk
    expected: tuple  # values the model allows (generations; 0 = zeros)
    found: str  # what was there
    phase: str  # "run" (a read through the device) or "after reopen"

    def describe(self) -> str:
        exp = ", ".join("zeros" if v == ZERO else f"generation {v}" for v in self.expected)
        return (
            f"data mismatch at offset {self.offset} (sector {self.offset // SECTOR}, {self.phase}): "
            f"expected {exp or 'nothing'}; found {self.found}"
        )


@dataclasses.dataclass
class StressReport:
    config: StressConfig
    seed: int
    image: str = ""
    format: str = ""
    size: int = 0
    elapsed: float = 0.0  # seconds of the timed phase (until the last completion)
    ops: dict = dataclasses.field(default_factory=dict)  # name -> completed requests
    bytes_read: int = 0
    bytes_written: int = 0
    verified_blocks: int = 0  # 4 KiB blocks read through the device and checked
    stamped_blocks: int = 0  # of those, blocks holding data this run wrote
    unverified_blocks: int = 0  # blocks read that this run never wrote (existing images)
    swept_blocks: int = 0  # blocks re-read and checked after the reopen
    mismatch_count: int = 0
    mismatches: list = dataclasses.field(default_factory=list)  # the first few Mismatch
    errors: list = dataclasses.field(default_factory=list)  # failed requests, described
    error_count: int = 0
    check: dict | None = None  # the image check's result (None: the format has no check)
    kept: bool = False

    @property
    def requests(self) -> int:
        return sum(self.ops.values())

    @property
    def iops(self) -> float:
        return self.requests / self.elapsed if self.elapsed else 0.0

    @property
    def mbps(self) -> float:
        return (self.bytes_read + self.bytes_written) / self.elapsed / 1e6 if self.elapsed else 0.0

    @property
    def check_clean(self) -> bool:
        c = self.check
        return c is None or not (c.get("corruptions") or c.get("leaks") or c.get("check-errors"))

    @property
    def ok(self) -> bool:
        return not self.mismatch_count and not self.error_count and self.check_clean


MAX_KEPT = 20  # mismatches and errors kept in the report (all are counted)


# -- stamps ----------------------------------------------------------------------------------------
_pool = random.Random(0x5EED).randbytes(_POOL_BYTES + BODY_BYTES)


def _body(gen: int) -> bytes:
    k = (gen * 2654435761) % _POOL_BYTES
    return _pool[k : k + BODY_BYTES]


def stamp(offset: int, nbytes: int, gen: int, run_id: int) -> bytearray:
    """The bytes a write of generation ``gen`` puts at ``offset`` (sector-aligned, ``nbytes`` a
    multiple of 512): every sector stamped with its own offset."""
    body = _body(gen)
    body_crc = zlib.crc32(body)
    buf = bytearray((bytes(HEADER_BYTES) + body) * (nbytes // SECTOR))
    pack = _HDR.pack_into
    pack_crc = _CRC.pack_into
    crc32 = zlib.crc32
    view = memoryview(buf)
    for p in range(0, nbytes, SECTOR):
        pack(buf, p, MAGIC, run_id, offset + p, gen)
        pack_crc(buf, p + 24, crc32(view[p : p + 24], body_crc))
    return buf


def read_sector(data, p: int, offset: int, run_id: int):
    """What the sector at ``data[p:p+512]`` (guest byte ``offset``) holds: a generation (> 0),
    ``ZERO``, or a string describing why it is neither."""
    magic, rid, off, gen, crc = _STAMP.unpack_from(data, p)
    if magic == MAGIC:
        good = zlib.crc32(data[p : p + 24], zlib.crc32(data[p + HEADER_BYTES : p + SECTOR]))
        if crc != good:
            return _damage(data, p, offset, gen, run_id)
        if rid != run_id:
            return f"a stamp from another run (run id {rid:#x})"
        if off != offset:
            return f"the stamp of offset {off} (generation {gen}): misplaced data"
        return gen
    if data[p : p + SECTOR] == _ZERO_SECTOR:
        return ZERO
    nz = next(i for i in range(SECTOR) if data[p + i])
    return f"unstamped data (first non-zero byte {data[p + nz]:#04x} at offset {offset + nz})"


def _damage(data, p, offset, gen, run_id) -> str:
    """Describe a stamped sector whose checksum fails: the first byte that differs from what
    generation ``gen`` wrote there (the header is trusted only as far as naming the generation)."""
    want = stamp(offset, SECTOR, gen, run_id)
    got = bytes(data[p : p + SECTOR])
    for i in range(SECTOR):
        if got[i] != want[i]:
            return (
                f"generation {gen} with byte {offset + i} changed "
                f"({got[i]:#04x} instead of {want[i]:#04x}): checksum fails"
            )
    return f"generation {gen} with a wrong checksum field"


# -- the model -------------------------------------------------------------------------------------
class _Op:
    __slots__ = (
        "type",
        "value",
        "first",
        "count",
        "queue",
        "concurrent",
        "allowed",
        "req",
        "keep_old",
    )

    def __init__(self, type_, value, first, count, queue):
        self.type = type_
        self.value = value  # generation written, ZERO for write-zeroes/discard, None otherwise
        self.first = first  # first block
        self.count = count  # blocks
        self.queue = queue
        self.concurrent = None  # writes: block -> values of writes overlapping in time
        self.allowed = None  # reads: block -> values the read may see
        self.req = None
        self.keep_old = type_ == DISCARD


class Model:
    """Which values each 4 KiB block may hold (see the module docstring)."""

    def __init__(self, base=ZERO):
        self.base = base  # value of a block nothing has touched
        self.single = {}  # block -> the one possible value
        self.multi = {}  # block -> frozenset of possible values (overrides single)
        self.inflight = {}  # block -> [ops in flight covering it]
        self.touched = set()  # blocks any write-like request covered

    def possible(self, b):
        m = self.multi.get(b)
        if m is not None:
            return m
        return (self.single.get(b, self.base),)

    def issue(self, op):
        inflight = self.inflight
        is_read = op.type == IN
        if is_read:
            op.allowed = allowed = {}
        for b in range(op.first, op.first + op.count):
            lst = inflight.get(b)
            if is_read:
                vals = set(self.possible(b))
                if lst:
                    for o in lst:
                        if o.value is not None:
                            vals.add(o.value)
                allowed[b] = vals
            elif lst:
                v = op.value
                for o in lst:
                    if o.type == IN:
                        o.allowed[b].add(v)
                    elif o.value is not None:
                        if o.concurrent is None:
                            o.concurrent = {}
                        o.concurrent.setdefault(b, set()).add(v)
                        if op.concurrent is None:
                            op.concurrent = {}
                        op.concurrent.setdefault(b, set()).add(o.value)
            if lst is None:
                inflight[b] = [op]
            else:
                lst.append(op)
        if op.value is not None:
            self.touched.update(range(op.first, op.first + op.count))

    def complete(self, op):
        inflight = self.inflight
        conc = op.concurrent
        writes = op.value is not None
        for b in range(op.first, op.first + op.count):
            lst = inflight[b]
            if len(lst) == 1:
                del inflight[b]
            else:
                lst.remove(op)
            if not writes:
                continue
            extra = conc.get(b) if conc else None
            if extra is None and not op.keep_old:
                self.single[b] = op.value
                self.multi.pop(b, None)
                continue
            vals = {op.value}
            if extra:
                vals |= extra
            if op.keep_old:
                vals.update(self.possible(b))
            if len(vals) == 1:
                self.single[b] = op.value
                self.multi.pop(b, None)
            else:
                self.multi[b] = frozenset(vals)

    def forget(self, op):
        """A request that failed: its blocks may hold anything it or the old data left (unknown)."""
        for b in range(op.first, op.first + op.count):
            lst = self.inflight.get(b)
            if lst and op in lst:
                lst.remove(op)
                if not lst:
                    del self.inflight[b]
            if op.value is not None:
                self.multi.pop(b, None)
                self.single[b] = UNKNOWN


# -- the run ---------------------------------------------------------------------------------------
class _Runner:
    def __init__(
        self, cfg: StressConfig, report: StressReport, run_id: int, rng: random.Random, model: Model
    ):
        self.cfg = cfg
        self.report = report
        self.run_id = run_id
        self.rng = rng
        self.model = model
        self.gen = 0

    # verification shared by device reads and the sweep
    def verify(self, data, first_block, nblocks, allowed_of, phase):
        """Check ``nblocks`` blocks of ``data`` (guest blocks from ``first_block``) against the
        values ``allowed_of(block)`` permits. Fast path: a run of blocks that may each hold only
        the same one generation is compared whole with the stamp that write made (one memcmp);
        anything else is judged sector by sector (``_check_block``)."""
        rep = self.report
        run_id = self.run_id
        if type(data) is not bytes:
            data = bytes(data)  # one copy; comparing memoryview slices is element by element
        run = phase == "run"
        i = 0
        while i < nblocks:
            vals = allowed_of(first_block + i)
            if len(vals) == 1:
                v = next(iter(vals))
                if v > 0:  # one generation: extend over the following blocks that agree
                    j = i + 1
                    while j < nblocks:
                        w = allowed_of(first_block + j)
                        if len(w) != 1 or v not in w:
                            break
                        j += 1
                    if data[i * BLOCK : j * BLOCK] == stamp(
                        (first_block + i) * BLOCK, (j - i) * BLOCK, v, run_id
                    ):
                        if run:
                            rep.verified_blocks += j - i
                            rep.stamped_blocks += j - i
                        else:
                            rep.swept_blocks += j - i
                        i = j
                        continue
            self._check_block(data, i, first_block + i, vals, run)
            i += 1

    def _check_block(self, data, i, b, vals, run):
        rep = self.report
        base = i * BLOCK
        if UNKNOWN in vals:
            rep.unverified_blocks += 1
            return
        if ZERO in vals and data[base : base + BLOCK] == _ZERO_BLOCK:
            if run:
                rep.verified_blocks += 1
            else:
                rep.swept_blocks += 1
            return
        stamped = False
        for s in range(SECTORS_PER_BLOCK):
            p = base + s * SECTOR
            off = b * BLOCK + s * SECTOR
            got = read_sector(data, p, off, self.run_id)
            if type(got) is int and got in vals:
                stamped = stamped or got != ZERO
                continue
            if type(got) is int:
                got = "zeros" if got == ZERO else f"generation {got}"
            self.mismatch(Mismatch(off, tuple(sorted(vals)), got, "run" if run else "after reopen"))
        if run:
            rep.verified_blocks += 1
            if stamped:
                rep.stamped_blocks += 1
        else:
            rep.swept_blocks += 1

    def mismatch(self, m):
        rep = self.report
        rep.mismatch_count += 1
        if len(rep.mismatches) < MAX_KEPT:
            rep.mismatches.append(m)

    def error(self, text):
        rep = self.report
        rep.error_count += 1
        if len(rep.errors) < MAX_KEPT:
            rep.errors.append(text)

    def next_op(self, nblocks_disk, queue):
        rng = self.rng
        r = rng.random()
        mix = self.cfg.mix
        if r < mix[0]:
            t = IN
        elif r < mix[0] + mix[1]:
            t = OUT
        elif r < mix[0] + mix[1] + mix[2]:
            t = WZ
        elif r < mix[0] + mix[1] + mix[2] + mix[3]:
            t = DISCARD
        else:
            return _Op(FLUSH, None, 0, 0, queue)
        n = min(rng.choice(SIZES_BLOCKS), nblocks_disk)
        span = min(HOT_BLOCKS, nblocks_disk) if rng.random() < 0.2 else nblocks_disk
        first = rng.randrange(max(1, span - n + 1))
        if t == OUT:
            self.gen += 1
            value = self.gen
        elif t == IN:
            value = None
        else:
            value = ZERO
        return _Op(t, value, first, n, queue)


class _Causes:
    """Stands between the device and the image and keeps why requests failed, by operation and
    byte offset: the device answers IOERR whatever the cause, and the report names the cause.
    Completion callbacks run in the order they were added, so a cause is kept before the device
    completes the request it belongs to."""

    def __init__(self, img):
        self._img = img
        self._lock = threading.Lock()
        self._kept = collections.defaultdict(collections.deque)  # (name, offset) -> exceptions

    def __getattr__(self, name):  # everything else is the image's
        return getattr(self._img, name)

    def submit_read(self, offset, buffers):
        return self._watch(("read", offset), self._img.submit_read, offset, buffers)

    def submit_write(self, offset, buffers, fua=False):
        return self._watch(("write", offset), self._img.submit_write, offset, buffers, fua)

    def submit_flush(self):
        return self._watch(("flush", None), self._img.submit_flush)

    def submit_discard(self, offset, length):
        return self._watch(("discard", offset), self._img.submit_discard, offset, length)

    def submit_write_zeroes(self, offset, length, may_unmap=False):
        return self._watch(
            ("write-zeroes", offset), self._img.submit_write_zeroes, offset, length, may_unmap
        )

    def _watch(self, key, call, *args):
        try:
            fut = call(*args)
        except Exception as exc:
            self._keep(key, exc)
            raise
        fut.add_done_callback(lambda f: f.exception() is None or self._keep(key, f.exception()))
        return fut

    def _keep(self, key, exc):
        with self._lock:
            self._kept[key].append(exc)

    def pop(self, name, offset):
        """The kept cause of a failed ``name`` request at ``offset`` (bytes; None for flush)."""
        with self._lock:
            kept = self._kept.get((name, offset))
            return kept.popleft() if kept else None


def describe_cause(exc) -> str:
    """``ENOSPC: No space left on device`` for a host error, ``ImageError: ...`` otherwise."""
    if isinstance(exc, OSError) and exc.errno:
        return (
            f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror or os.strerror(exc.errno)}"
        )
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _scratch_dir(cfg):
    base = cfg.workdir or os.environ.get("VBLOCK_STRESS_DIR")
    if base is None:
        base = "/var/tmp" if os.path.isdir("/var/tmp") and os.access("/var/tmp", os.W_OK) else None
    return tempfile.mkdtemp(prefix="vblock-stress-", dir=base)


def _open(path, fmt, read_only=False):
    try:
        return vblock.open_image(path, format=fmt, read_only=read_only)
    except OSError as exc:
        if exc.errno != errno.EINVAL:  # O_DIRECT refused (tmpfs): use the page cache
            raise
        return vblock.open_image(path, format=fmt, read_only=read_only, cache="writeback")


def _pow2_at_least(n):
    p = 1
    while p < n:
        p <<= 1
    return p


def run(cfg: StressConfig, progress=None) -> StressReport:
    """Run the stress job described by ``cfg``. ``progress(report, fraction)``, if given, is called
    a few times a second from the calling thread. Returns the report; raises only for setup
    failures (bad image, bad format, host errors outside requests)."""
    if cfg.queues < 1 or cfg.depth < 1:
        raise ValueError("queues and depth must be at least 1")
    if cfg.duration < 0:
        raise ValueError("duration must not be negative")
    seed = cfg.seed if cfg.seed is not None else int(time.time() * 1000) & 0xFFFFFFFF
    rng = random.Random(seed)
    run_id = random.Random(seed ^ 0xA5A5A5A5).getrandbits(32) | 1
    report = StressReport(config=cfg, seed=seed)
    tmpdir = None
    created = True
    if cfg.image is None:
        tmpdir = _scratch_dir(cfg)
        fmt = cfg.format or "qed"
        path = os.path.join(tmpdir, f"stress.{fmt}")
    else:
        path = cfg.image
        fmt = cfg.format
        created = False
        if not os.path.exists(path) and not is_nbd_uri(path):  # a URI: the server says
            raise FileNotFoundError(
                errno.ENOENT, "no such image (stress --image uses an existing one)", path
            )
    try:
        if created:
            if cfg.size < BLOCK or cfg.size % BLOCK:
                raise ValueError(f"size {cfg.size} must be a positive multiple of {BLOCK}")
            vblock.create_image(path, fmt, cfg.size).close()
        img = _open(path, fmt)
        report.image, report.format, report.size = path, img.format, img.size
        try:
            model = Model(base=ZERO if created else UNKNOWN)
            runner = _Runner(cfg, report, run_id, rng, model)
            _drive(cfg, img, runner, progress)
        finally:
            img.close()
        _after_reopen(path, img.format, runner)
    finally:
        if tmpdir is not None:
            if cfg.keep:
                report.kept = True
            else:
                shutil.rmtree(tmpdir, ignore_errors=True)
    return report


def _drive(cfg, img, runner, progress):
    report = runner.report
    model = runner.model
    nblocks = img.size // BLOCK
    if nblocks < 1:
        raise ValueError(f"{img.path}: the image is smaller than {BLOCK} bytes")
    qsize = min(32768, _pow2_at_least(max(16, 3 * cfg.depth + 2)))
    max_req = max(SIZES_BLOCKS) * BLOCK
    per_req = _pow2_at_least(max_req + 17)
    mem_size = cfg.queues * cfg.depth * per_req + cfg.queues * qsize * 64 + (16 << 20)
    mem = GuestMemory.anonymous(mem_size)
    causes = _Causes(img)
    dev = VirtioBlk(causes, mem, num_queues=cfg.queues, queue_size_max=qsize)
    mmio = VirtioMmio(dev)
    drv = Driver(mmio, mem, num_queues=cfg.queues, queue_size=qsize, event_idx=True, indirect=False)
    drv.start()
    if len(drv.queues) != cfg.queues:
        raise RuntimeError(f"the device gave {len(drv.queues)} queues, not {cfg.queues}")
    counts = {name: 0 for name in OP_NAMES.values()}
    report.ops = counts
    qin = [0] * cfg.queues
    depth = cfg.depth
    start = time.perf_counter()
    deadline = start + cfg.duration
    next_report = start + 0.25
    stamp_fn = stamp
    run_id = runner.run_id
    submit = drv.submit
    verify = runner.verify
    last_done = start
    try:
        while True:
            now = time.perf_counter()
            running = now < deadline
            if running:
                for q in range(cfg.queues):
                    while qin[q] < depth:
                        op = runner.next_op(nblocks, q)
                        model.issue(op)
                        t = op.type
                        sector = op.first * SECTORS_PER_BLOCK
                        if t == IN:
                            req = submit(IN, sector, read_len=op.count * BLOCK, queue=q, kick=False)
                        elif t == OUT:
                            data = stamp_fn(op.first * BLOCK, op.count * BLOCK, op.value, run_id)
                            req = submit(OUT, sector, data=data, queue=q, kick=False)
                        elif t == FLUSH:
                            req = submit(FLUSH, 0, queue=q, kick=False)
                        else:
                            flags = (
                                S.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
                                if t == WZ and runner.rng.random() < 0.5
                                else 0
                            )
                            seg = encode_segments([(sector, op.count * SECTORS_PER_BLOCK, flags)])
                            req = submit(t, 0, data=seg, queue=q, kick=False)
                        req.sector = (
                            op  # the driver is done with .sector once submitted: carry the op
                        )
                        qin[q] += 1
                drv.kick()
            elif not drv.in_flight():
                break
            for req in drv.wait_any():
                op = req.sector
                qin[op.queue] -= 1
                name = OP_NAMES[op.type]
                counts[name] += 1
                if req.status != S.VIRTIO_BLK_S_OK:
                    status = {S.VIRTIO_BLK_S_IOERR: "IOERR", S.VIRTIO_BLK_S_UNSUPP: "UNSUPP"}.get(
                        req.status, req.status
                    )
                    where = (
                        f" at offset {op.first * BLOCK} (+{op.count * BLOCK} bytes)"
                        if op.count
                        else ""
                    )
                    cause = causes.pop(name, op.first * BLOCK if op.count else None)
                    why = f" ({describe_cause(cause)})" if cause is not None else ""
                    runner.error(f"{name}{where} failed with status {status}{why}")
                    model.forget(op)
                    continue
                if op.type == IN:
                    report.bytes_read += op.count * BLOCK
                    allowed = op.allowed
                    model.complete(op)
                    verify(req.data, op.first, op.count, allowed.__getitem__, "run")
                else:
                    if op.type == OUT:
                        report.bytes_written += op.count * BLOCK
                    model.complete(op)
            last_done = time.perf_counter()
            if progress is not None and last_done >= next_report:
                next_report = last_done + 0.25
                report.elapsed = last_done - start
                progress(
                    report, min(1.0, (last_done - start) / cfg.duration) if cfg.duration else 1.0
                )
        report.elapsed = last_done - start
        status = drv.flush()
        if status != S.VIRTIO_BLK_S_OK:
            cause = causes.pop("flush", None)
            why = f" ({describe_cause(cause)})" if cause is not None else ""
            runner.error(f"final flush failed with status {status}{why}")
    finally:
        drv.reset()


def _after_reopen(path, fmt, runner):
    """Reopen the image, re-read every block the run touched and check the image."""
    report = runner.report
    model = runner.model
    img = _open(path, fmt, read_only=True)
    try:
        per = SWEEP_BYTES // BLOCK
        nblocks = img.size // BLOCK
        # every 1 MiB piece of the disk that the run touched, whole: untouched blocks in it are
        # checked too (zeros on an image the run created; skipped on a given one)
        ranges = [
            (c * per, min(nblocks, (c + 1) * per))
            for c in sorted({b // per for b in model.touched})
        ]
        pending = collections.deque()

        def settle(limit):
            while len(pending) > limit:
                fut, buf, lo, hi = pending.popleft()
                try:
                    fut.result()
                except OSError as exc:
                    runner.error(
                        f"read at offset {lo * BLOCK} after reopen failed ({describe_cause(exc)})"
                    )
                    continue
                runner.verify(buf, lo, hi - lo, model.possible, "after reopen")

        for lo, hi in ranges:
            buf = alloc_buffer((hi - lo) * BLOCK)  # aligned: O_DIRECT reads need no bounce
            pending.append((img.submit_read(lo * BLOCK, buf), buf, lo, hi))
            settle(SWEEP_DEPTH)
        settle(0)
        if not _has_check(img):
            report.check = None
        else:
            report.check = img.check()
    finally:
        img.close()


def _has_check(img):
    from vblock.block.interface import BlockDriver

    return type(img.driver).check is not BlockDriver.check

"""QED interop with QEMU, both ways: qemu-img/qemu-io write, vblock reads; vblock writes,
qemu-img check / compare / map agree. Skipped (with the reason) where qemu-utils is missing."""

import json
import random
import shutil
import subprocess

import pytest

from tests.qed.qed_helpers import KiB, MiB, create, header, pattern, reopen

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = [
    pytest.mark.interop,
    pytest.mark.skipif(
        not (QEMU_IMG and QEMU_IO), reason="qemu-img/qemu-io not installed (apt install qemu-utils)"
    ),
]


def run(*args, check=True):
    r = subprocess.run(args, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def qemu_io(path, *cmds, fmt_="qed"):
    args = [QEMU_IO, "-f", fmt_]
    for c in cmds:
        args += ["-c", c]
    return run(*args, str(path))


def qemu_check(path):
    r = run(QEMU_IMG, "check", "--output=json", "-f", "qed", str(path), check=False)
    return r.returncode, json.loads(r.stdout) if r.stdout.strip() else {}


def layer0_kinds(path, size, cs):
    """Per-cluster kind in this layer from qemu-img map: 'data' (with host offset), 'zero', or
    'unallocated' (left to the backing file)."""
    out = json.loads(run(QEMU_IMG, "map", "--output=json", "-f", "qed", str(path)).stdout)
    kinds = {}
    for e in out:
        for c in range(e["start"] // cs, -(-(e["start"] + e["length"]) // cs)):
            pos = c * cs
            if e["depth"] == 0 and e["present"] and e["data"]:
                kinds[c] = ("data", e["offset"] + pos - e["start"])
            elif e["depth"] == 0 and e["present"]:
                kinds[c] = ("zero", None)
            else:
                kinds[c] = ("unallocated", None)
    return [kinds[c] for c in range(-(-size // cs))]


def our_kinds(img, cs):
    kinds = []
    for r in img.driver.block_status(0, img.size):
        for c in range(r.offset // cs, -(-(r.offset + r.length) // cs)):
            host = r.host_offset + c * cs - r.offset if r.kind == "data" else None
            kinds.append((r.kind, host))
    return kinds


# -- QEMU writes, vblock reads -----------------------------------------------------------------


@pytest.mark.parametrize("cs,ts", [(4096, 2), (4096, 4), (65536, 4), (1 << 20, 2)])
@pytest.mark.parametrize("backing", [None, "raw", "qed"])
def test_qemu_written_images_read_back_exactly(scratch, cs, ts, backing):
    size = 8 * MiB
    p = scratch / "q.qed"
    ref = bytearray(size)
    create_args = [
        QEMU_IMG,
        "create",
        "-q",
        "-f",
        "qed",
        "-o",
        f"cluster_size={cs},table_size={ts}",
    ]
    if backing == "raw":
        with open(scratch / "b.raw", "wb") as f:
            f.write(pattern(0x5A, 3 * MiB + 512))
        ref[: 3 * MiB + 512] = pattern(0x5A, 3 * MiB + 512)
        create_args += ["-b", "b.raw", "-F", "raw"]
    elif backing == "qed":
        run(QEMU_IMG, "create", "-q", "-f", "qed", str(scratch / "b.qed"), str(size))
        qemu_io(scratch / "b.qed", "write -P 0x3c 1M 2M")
        ref[1 * MiB : 3 * MiB] = pattern(0x3C, 2 * MiB)
        create_args += ["-b", "b.qed", "-F", "qed"]
    run(*create_args, str(p), str(size))
    if backing == "raw":
        assert header(p).features == 0x05
    cmds = [
        ("write -P 0x11 0 4k", 0, 4 * KiB, 0x11),
        ("write -P 0x22 6k 10k", 6 * KiB, 10 * KiB, 0x22),
        ("write -P 0x33 2M 1536k", 2 * MiB, 1536 * KiB, 0x33),
        ("write -P 0x44 7M 512", 7 * MiB, 512, 0x44),
    ]
    qemu_io(p, *(c[0] for c in cmds))
    for _, off, n, b in cmds:
        ref[off : off + n] = bytes([b]) * n
    qemu_io(p, "write -z 4M 1M")  # zero clusters (aligned for every geometry here)
    ref[4 * MiB : 5 * MiB] = bytes(1 * MiB)
    img = reopen(p, read_only=True)
    assert img.read(0, size) == bytes(ref)
    assert our_kinds(img, cs) == layer0_kinds(p, size, cs)
    img.close()


def test_qemu_zero_clusters_are_markers(scratch):
    p = scratch / "z.qed"
    run(QEMU_IMG, "create", "-q", "-f", "qed", str(p), "1M")
    qemu_io(p, "write -z 0 128k")
    img = reopen(p, read_only=True)
    assert [r.kind for r in img.driver.block_status(0, 128 * KiB)] == ["zero"]
    img.close()


# -- vblock writes, QEMU checks ----------------------------------------------------------------


def _random_workload(img, ref, rnd, steps, cs):
    for _ in range(steps):
        op = rnd.random()
        off = rnd.randrange(0, len(ref) // 512) * 512
        n = min(rnd.randrange(1, 64) * 512, len(ref) - off)
        if op < 0.6:
            b = rnd.randrange(1, 256)
            img.write(off, bytes([b]) * n)
            ref[off : off + n] = bytes([b]) * n
        elif op < 0.8:
            img.write_zeroes(off, n)
            ref[off : off + n] = bytes(n)
        elif op < 0.9:
            # discard: whole allocated clusters read zeros afterwards; model by zeroing first
            a, e = -(-off // cs) * cs, (off + n) // cs * cs
            if a < e:
                img.write_zeroes(a, e - a)
                ref[a:e] = bytes(e - a)
            img.discard(off, n)
        else:
            img.flush()


@pytest.mark.parametrize("cs,ts", [(4096, 2), (65536, 4)])
@pytest.mark.parametrize("backing", [False, True])
def test_vblock_written_images_pass_qemu_check_and_compare(scratch, cs, ts, backing):
    size = 6 * MiB
    rnd = random.Random(cs + ts + backing)
    ref = bytearray(size)
    opts = dict(cluster_size=cs, table_size=ts)
    if backing:
        base = bytes(rnd.randrange(256) for _ in range(4096)) * (5 * MiB // 4096)
        with open(scratch / "b.raw", "wb") as f:
            f.write(base)
        ref[: len(base)] = base
        opts.update(backing_file="b.raw", backing_fmt="raw")
    p = scratch / "v.qed"
    img = create(p, size, **opts)
    _random_workload(img, ref, rnd, 150, cs)
    img.resize(size + 2 * MiB)
    ref += bytes(2 * MiB)
    img.write(size + MiB, pattern(0x99, 8192))
    ref[size + MiB : size + MiB + 8192] = pattern(0x99, 8192)
    assert img.read(0, len(ref)) == bytes(ref)
    ours = our_kinds(img, cs)
    img.close()
    assert not header(p).need_check
    rc, result = qemu_check(p)
    assert rc == 0, result
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0
    with open(scratch / "ref.raw", "wb") as f:
        f.write(ref)
    r = run(
        QEMU_IMG, "compare", "-f", "qed", "-F", "raw", str(p), str(scratch / "ref.raw"), check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert ours == layer0_kinds(p, len(ref), cs)


def test_vblock_layout_is_byte_identical_to_qemu(scratch):
    ours, theirs = scratch / "ours.qed", scratch / "theirs.qed"
    create(ours, 1 << 30).close()
    run(QEMU_IMG, "create", "-q", "-f", "qed", str(theirs), "1G")
    assert ours.read_bytes() == theirs.read_bytes()
    img = reopen(ours)
    img.write(64 * KiB, pattern(0xAB, 64 * KiB))
    img.close()
    qemu_io(theirs, "write -P 0xab 64k 64k")
    assert ours.read_bytes() == theirs.read_bytes()


def test_vblock_backing_header_matches_qemu(scratch):
    with open(scratch / "base.raw", "wb") as f:
        f.write(bytes(4096))
    ours, theirs = scratch / "ours.qed", scratch / "theirs.qed"
    create(ours, 1 << 30, backing_file="base.raw", backing_fmt="raw").close()
    run(QEMU_IMG, "create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", str(theirs), "1G")
    assert ours.read_bytes() == theirs.read_bytes()


def test_crash_image_is_consistent_for_qemu_and_repaired_by_vblock(scratch):
    # A crash leaves need-check set and, without a backing file, the file's growth reserve past
    # the allocation pointer: QEMU sees leaks only (exit 3, never a corruption) and can read the
    # data; vblock's read-write open repairs it to a clean image.
    p = scratch / "nc.qed"
    img = create(p, 4 * MiB, cluster_size=4096, table_size=2)
    img.write(0, pattern(1, 4096))
    assert header(p).need_check
    snapshot = p.read_bytes()
    img.close()
    crash = scratch / "crash.qed"
    with open(crash, "wb") as f:
        f.write(snapshot)
    rc, result = qemu_check(crash)
    assert rc in (0, 3) and result.get("corruptions", 0) == 0, result
    qemu_io(crash, "read -P 1 0 4k")
    with open(crash, "wb") as f:
        f.write(snapshot)
    img = reopen(crash)
    assert not header(crash).need_check
    img.close()
    rc, result = qemu_check(crash)
    assert rc == 0, result
    qemu_io(crash, "read -P 1 0 4k")


def test_qemu_sizes_rounded_like_vblock(scratch):
    # iotest 104: 1024 and 1234 -> 1536
    for size, want in ((1024, 1024), (1234, 1536)):
        run(QEMU_IMG, "create", "-q", "-f", "qed", str(scratch / "q.qed"), str(size))
        create(scratch / "v.qed", size).close()
        assert header(scratch / "q.qed").image_size == want == header(scratch / "v.qed").image_size


def test_table_size_one_images_qemu_creates_but_cannot_open(scratch):
    # reference §2 step 8: QEMU's overflow guard rejects every table_size=1 image it creates
    p = scratch / "t1.qed"
    run(QEMU_IMG, "create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=1", str(p), "4M")
    assert run(QEMU_IO, "-f", "qed", "-c", "read 0 512", str(p), check=False).returncode != 0
    img = reopen(p)
    img.write(3 * MiB, pattern(0x31, 8192))
    assert img.read(3 * MiB, 8192) == pattern(0x31, 8192)
    r = img.check()
    assert (r["corruptions"], r["leaks"]) == (0, 0)
    img.close()

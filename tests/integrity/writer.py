"""A writer process for the SIGKILL test: seeded random writes to a QED image, several in flight,
with a flush every few writes; after each completed flush it prints ``FLUSHED <n>``: writes
0..n-1 are durable. Write ``i`` covers sectors derived from (seed, i) with crashlib patterns."""

import random
import sys

import vblock
from tests.integrity.crashlib import pattern

SIZE = 8 << 20


def plan(seed, i):
    """(offset, length) of write i of the run with ``seed``."""
    rng = random.Random(seed * 1_000_003 + i)
    length = rng.choice([512, 4096, 8192, 12288, 65536])
    offset = rng.randrange(0, (SIZE - length) // 512) * 512
    return offset, length


def data(seed, i):
    offset, length = plan(seed, i)
    wid = seed * 100_000 + i + 1
    return offset, b"".join(pattern(wid, offset // 512 + k) for k in range(length // 512))


def main(path, seed):
    img = vblock.open_image(path, format="qed", cache="none")
    i = 0
    while True:
        futs = []
        for _ in range(8):
            offset, buf = data(seed, i)
            futs.append(img.submit_write(offset, [buf]))
            i += 1
        for f in futs:
            f.result()
        img.flush()
        print(f"FLUSHED {i}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))

"""Model-based test: the driver against a bytearray, with 4 KiB clusters and table_size 1 so that
L2 boundaries and cache evictions happen all the time."""

import os
import shutil
import tempfile

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.qed.qed_helpers import create, reopen

CS = 4096
REGION = 2 << 20  # guest bytes per L2 table for 4K/1
SIZE = 3 * REGION
BASE = 0xC3  # backing file content


def _offsets():
    # near the interesting places: region boundaries, cluster boundaries, anywhere
    near = st.sampled_from([0, REGION, 2 * REGION, SIZE - 4 * CS])
    return st.one_of(
        st.builds(lambda b, d: max(0, min(SIZE - 512, b + d * 512)), near, st.integers(-16, 16)),
        st.integers(0, SIZE // 512 - 1).map(lambda s: s * 512),
    )


def make_machine(backing, cache_size):
    class QedModel(RuleBasedStateMachine):
        @initialize()
        def setup(self):
            self.dir = tempfile.mkdtemp(prefix="qed-model-", dir="/var/tmp")
            self.path = os.path.join(self.dir, "m.qed")
            opts = dict(cluster_size=CS, table_size=1)
            self.size = SIZE
            if backing:
                with open(os.path.join(self.dir, "b.raw"), "wb") as f:
                    f.write(bytes([BASE]) * SIZE)
                opts.update(backing_file="b.raw", backing_fmt="raw")
            create(self.path, SIZE, **opts).close()
            self._open()
            self.model = bytearray([BASE if backing else 0]) * SIZE
            self.state = {}  # cluster index -> "D" (data) or "Z" (zero marker); absent: unallocated

        def _open(self):
            self.img = reopen(self.path, l2_cache_size=cache_size)
            if cache_size == 1:  # the fast path's memory of mappings: filled and cleared constantly
                self.img.driver.state.hosts_max = 2

        def teardown(self):
            if getattr(self, "img", None) is not None:
                r = self.img.check()
                self.img.close()
                assert (r["corruptions"], r["leaks"], r["check-errors"]) == (0, 0, 0), r
            shutil.rmtree(getattr(self, "dir", "/nonexistent"), ignore_errors=True)

        def _clusters(self, off, n):
            return range(off // CS, (off + n + CS - 1) // CS)

        @rule(off=_offsets(), n=st.integers(1, 24).map(lambda k: k * 512), byte=st.integers(1, 255))
        def write(self, off, n, byte):
            n = min(n, self.size - off)
            self.img.write(off, bytes([byte]) * n)
            self.model[off : off + n] = bytes([byte]) * n
            for c in self._clusters(off, n):
                self.state[c] = "D"

        @rule(off=_offsets(), n=st.integers(1, 40).map(lambda k: k * 512))
        def read(self, off, n):
            n = min(n, self.size - off)
            assert self.img.read(off, n) == bytes(self.model[off : off + n])

        @rule(off=_offsets(), n=st.integers(1, 24).map(lambda k: k * 512))
        def write_zeroes(self, off, n):
            n = min(n, self.size - off)
            self.img.write_zeroes(off, n)
            self.model[off : off + n] = bytes(n)
            a, b = -(-off // CS), (off + n) // CS
            for c in self._clusters(off, n):
                if a <= c < b:
                    self.state[c] = self.state.get(c) == "D" and "D" or "Z"
                else:
                    self.state[c] = "D"

        @rule(off=_offsets(), n=st.integers(1, 24).map(lambda k: k * 512))
        def discard(self, off, n):
            n = min(n, self.size - off)
            self.img.discard(off, n)
            for c in range(-(-off // CS), (off + n) // CS):
                if self.state.get(c) == "D":  # whole allocated clusters: hole punched
                    self.model[c * CS : (c + 1) * CS] = bytes(CS)

        @rule()
        def flush(self):
            self.img.flush()

        @rule()
        def reopen(self):
            self.img.close()
            self._open()

        @precondition(lambda self: self.size < SIZE + 4 * REGION)
        @rule(grow=st.integers(1, 8).map(lambda k: k * 512 * 1024))
        def resize(self, grow):
            self.img.resize(self.size + grow)
            self.size += grow
            # the backing file is SIZE long: past it, unallocated reads zeros
            self.model += bytes(grow)

        @invariant()
        def size_matches(self):
            if getattr(self, "img", None) is not None:
                assert self.img.size == self.size

    QedModel.TestCase.settings = settings(
        max_examples=int(os.environ.get("QED_MODEL_EXAMPLES", 25)),
        stateful_step_count=25,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    return QedModel


TestModelNoBackingCache1 = make_machine(False, 1).TestCase
TestModelBackingCache2 = make_machine(True, 2).TestCase
TestModelBackingCache64 = make_machine(True, 64).TestCase

"""compact.plan: moves fill leaks from the end of the file, never onto used clusters, and the file
ends right after the last cluster still in use."""

from hypothesis import given, settings
from hypothesis import strategies as st

from vblock.drivers.qed import compact


@st.composite
def layouts(draw):
    ts = draw(st.sampled_from([1, 2, 4]))
    n = draw(st.integers(4, 60))
    fixed = 1 + ts  # header cluster + L1 table
    kinds = []  # per cluster from `fixed`: "leak", "data" or a table start
    i = fixed
    while i < n:
        k = draw(st.sampled_from(["leak", "data", "data", "table"]))
        if k == "table" and i + ts <= n:
            kinds.extend([("table", i)] * ts)
            i += ts
        elif k != "table":
            kinds.append((k, None))
            i += 1
        else:
            kinds.append(("leak", None))
            i += 1
    return ts, fixed, kinds


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_plan_fills_leaks_from_the_end(layout):
    ts, fixed, kinds = layout
    n = fixed + len(kinds)
    leaked = [fixed + j for j, (k, _) in enumerate(kinds) if k == "leak"]
    used = {fixed + j for j, (k, _) in enumerate(kinds) if k != "leak"} | set(range(fixed))

    def owner(i):
        if i < fixed:
            return None
        k, first = kinds[i - fixed]
        if k == "data":
            return ("data", 0, i)
        return ("table", first, first)

    moves = compact.plan(leaked, n, ts, owner)
    final = set(used)
    dests = []
    for src, dst, _, _ in moves.data:
        assert dst in leaked and dst < src and src in used
        final.discard(src)
        final.add(dst)
        dests.append(dst)
    for src, dst, _ in moves.tables:
        block = range(dst, dst + ts)
        assert all(i in leaked for i in block) and dst < src
        final.difference_update(range(src, src + ts))
        final.update(block)
        dests.extend(block)
    assert len(dests) == len(set(dests))  # no destination is used twice
    assert moves.end == max(final) + 1
    # Whatever stays free below the end could not take any cluster above it.
    holes = [i for i in range(moves.end) if i not in final]
    if holes and moves.end - 1 not in range(fixed):
        k, first = kinds[moves.end - 1 - fixed]
        if k == "data":
            assert not holes  # a data cluster at the end always moves into a hole

"""Work counted from real kernel calls: every schedule runs on the `counting` backend (reference plus a
tally of the allowed pairs of each call it is handed, from the oracle's element-wise mask), and the pairs
the schedule recorded per step (CommStats.work), the registry's work model and the planner's tables must
all add up to what the kernels were actually asked to compute, rank by rank and phase by phase."""

import pytest

from ._cases import check, grid, launch


def _hybrid(ring, uly, **kw):
    return [dict(strategy="hybrid", mesh=(ring, uly), layout=layout, b=1, n=8 * ring * uly, h=2 * uly, hkv=uly,
                 d=8, causal=causal, window=window, kernel="counting", **kw)
            for layout in ("zigzag", "striped") for causal, window in ((True, None), (False, 5))]


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_recorded_and_modelled_work_equal_the_counted_kernel_work(world):
    strategies = ["ring", "zigzag", "striped", "allgather", "ulysses"]
    cases = [dict(c, kernel="counting", b=1) for c in grid(strategies, world)[::2]]
    cases += [dict(c, kernel="counting", b=1) for c in grid(strategies, world, causals=(True, False), window=5)[::3]]
    cases += [dict(c, kernel="counting", b=1, layout=lay) for lay in ("contiguous", "striped")
              for c in grid(["allgather", "ulysses"], world, causals=(True,))[:1]]
    if world in (4, 8):
        cases += _hybrid(world // 2, 2)
    check(cases, launch(cases, world), world)

"""ParallelDims: validation with messages that name the fix, and the groups of every (flattened) mesh,
checked against rank sets computed here from row-major coordinates (pp, dp_replicate, dp_shard, cp, tp)."""

import itertools
import re

import pytest

from longctx.launch import RankError, run
from longctx.parallel import DIM_NAMES, ParallelDims

from ._dims_workers import late_on_a_subgroup, mesh_groups


def test_rest_of_world_and_derived_degrees():
    d = ParallelDims(dp_shard=-1, cp=2, world_size=8)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.dp, d.dp_cp) == (1, 4, 2, 4, 8)
    d = ParallelDims(cp=-1, strategy="hybrid", ulysses=2, world_size=8)
    assert (d.cp, d.ring, d.ulysses, d.layout) == (8, 4, 2, "zigzag")
    assert ParallelDims(cp=4, world_size=4, strategy="allgather", layout="striped").layout == "striped"
    assert ParallelDims(world_size=1).dp_cp == 1


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(dp_shard=2, cp=2, world_size=6), r"multiply to 4 \(pp=1 x dp_replicate=1 x dp_shard=2 x cp=2 x tp=1\) but "
                                           r"the world size is 6"),
    (dict(dp_shard=-1, cp=-1, world_size=4), r"at most one parallel degree may be -1.*parallel.dp_shard and "
                                             r"parallel.cp"),
    (dict(dp_shard=-1, cp=3, world_size=4), r"world size 4 is not divisible by the product of the other degrees "
                                            r"\(3"),
    (dict(cp=0, world_size=4), r"parallel.cp must be a positive int or -1"),
    (dict(cp=4, world_size=4, strategy="spiral"), r"unknown strategy 'spiral'"),
    (dict(cp=4, world_size=4, strategy="zigzg"), r"did you mean 'zigzag'"),
    (dict(cp=4, world_size=4, strategy="hybrid", ulysses=3), r"parallel.ulysses=3 does not divide parallel.cp=4"),
    (dict(cp=4, world_size=4, ulysses=2), r"only applies to parallel.strategy=hybrid"),
    (dict(cp=4, world_size=4, strategy="zigzag", layout="striped"), r"layout mismatch: strategy 'zigzag'"),
])
def test_bad_dims(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ParallelDims(**kwargs)


def test_sequence_and_heads_checks_give_the_divisor():
    d = ParallelDims(cp=4, world_size=4)
    assert d.seq_divisor() == 8
    with pytest.raises(ValueError, match=r"train.seq_len 100 is not divisible by 8 .*pad it by 4 tokens to 104"):
        d.check_seq_len(100)
    d.check_seq_len(104)
    hybrid = ParallelDims(cp=6, world_size=6, strategy="hybrid", ulysses=3)
    assert hybrid.seq_divisor() == 12  # lcm(2 x ring 2 (zigzag), 6 ranks)
    with pytest.raises(ValueError, match="not divisible by 12"):
        hybrid.check_seq_len(18)
    with pytest.raises(ValueError, match="hybrid ulysses: 4 query heads do not divide over 3 ranks"):
        hybrid.check_heads(4, 4)
    with pytest.raises(ValueError, match="ulysses: 6 query heads do not divide over 4 ranks"):
        ParallelDims(cp=4, world_size=4, strategy="ulysses").check_heads(6, 6)
    ParallelDims(cp=4, world_size=4, strategy="zigzag").check_heads(6, 3)  # the ring family splits no heads


def _expected(shape, rank, keep, names=DIM_NAMES):
    """Global ranks sharing `rank`'s coordinates on every dim not in `keep` (row-major over `names`)."""
    coords = list(itertools.product(*(range(s) for s in shape)))
    mine = coords[rank]
    fixed = [i for i, n in enumerate(names) if n not in keep]
    return [r for r, c in enumerate(coords) if all(c[i] == mine[i] for i in fixed)]


CASES = [
    dict(dp_replicate=2, dp_shard=2, cp=1),
    dict(dp_replicate=2, dp_shard=1, cp=2, strategy="hybrid", ulysses=2),
    dict(dp_replicate=1, dp_shard=2, cp=2),
    dict(dp_replicate=2, dp_shard=1, cp=2),
    dict(dp_replicate=1, dp_shard=1, cp=4, strategy="hybrid", ulysses=2),
    dict(dp_replicate=2, dp_shard=1, cp=1, tp=2),  # replicas of a tp model: HSDP with a shard dimension of 1
    dict(pp=2, dp_replicate=2, dp_shard=1, cp=1),
]


CASES_8 = [
    dict(dp_replicate=2, dp_shard=2, cp=2),
    dict(dp_replicate=2, dp_shard=1, cp=4, strategy="hybrid", ulysses=2),
    dict(dp_replicate=2, dp_shard=2, cp=1, tp=2),
]


@pytest.mark.parametrize("world,cases", [(4, CASES), (8, CASES_8)], ids=["W4", "W8"])
def test_mesh_groups_match_row_major_coordinates(world, cases):
    results = run(mesh_groups, world, args=(cases,), timeout=120, pg_timeout=45)
    for rank, per_rank in enumerate(results):
        for case, groups in zip(cases, per_rank):
            pp, tp = case.get("pp", 1), case.get("tp", 1)
            shape = (pp, case["dp_replicate"], case["dp_shard"], case["cp"], tp)
            want = {
                "tp": _expected(shape, rank, {"tp"}),
                "cp": _expected(shape, rank, {"cp"}),
                "dp_cp": _expected(shape, rank, {"dp_replicate", "dp_shard", "cp"}),
                "dp": _expected(shape, rank, {"dp_replicate", "dp_shard"}),
                "fsdp": _expected(shape, rank, {"dp_shard", "cp"}),
                "ddp": _expected(shape, rank, {"dp_replicate", "cp"}),
            }
            hsdp = case["dp_replicate"] > 1 and (case["dp_shard"] * case["cp"] > 1 or tp > 1 or pp > 1)
            assert ("hsdp.dp_replicate" in groups) == hsdp  # built only when HSDP can run
            if hsdp:
                assert groups["tp_shares_hsdp_root"], (case, rank)
                want["hsdp.dp_replicate"] = _expected(shape, rank, {"dp_replicate"})
                want["hsdp.dp_shard_cp"] = _expected(shape, rank, {"dp_shard", "cp"})
            if case.get("strategy") == "hybrid":  # cp = ring x ulysses, ulysses inner
                u = case["ulysses"]
                shape6 = (pp, case["dp_replicate"], case["dp_shard"], case["cp"] // u, u, tp)
                names6 = ("pp", "dp_replicate", "dp_shard", "ring", "ulysses", "tp")
                want["hybrid.ulysses"] = _expected(shape6, rank, {"ulysses"}, names6)
                want["hybrid.ring"] = _expected(shape6, rank, {"ring"}, names6)
            for name, ranks in want.items():
                assert groups[name] == ranks, (case, rank, name, groups[name], ranks)
            sizes = [case["dp_replicate"] * case["dp_shard"] * case["cp"], case["cp"],
                     case["dp_replicate"] * case["dp_shard"]]
            assert groups["none_when_one"] == [s == 1 for s in sizes]
            assert groups["timeouts_s"] == [45.0], groups["timeouts_s"]  # every group: the job's timeout


def test_a_peer_stuck_in_a_subgroup_fails_after_the_jobs_timeout():
    """Not after torch's 30 minutes for groups made without a timeout: the late rank's peer gives up at 3 s."""
    with pytest.raises(RankError, match="(?i)timed out|timeout"):
        run(late_on_a_subgroup, 4, args=(15.0,), timeout=60, pg_timeout=3)


def test_mesh_needs_the_validated_world_size():
    res = run(_build_wrong_world, 2, timeout=60)
    assert re.search(r"validated for world size 4 but the process group has 2 ranks", res[0])


def _build_wrong_world():
    try:
        ParallelDims(cp=4, world_size=4).build_mesh("cpu")
    except ValueError as e:
        return str(e)
    return "no error"

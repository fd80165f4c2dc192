"""The public entry point: bad input gets a clear error; many random calls in one group never hang."""

import random
import re

import pytest
import torch

from longctx.launch import run
from longctx.parallel import ContextParallelAttention, attention, strategy_layout

from . import _error_workers
from ._cases import check, launch
from ._workers import expect_errors


def _raw(strategy, c, h=4, hkv=2, **kw):
    return dict(raw=True, strategy=strategy, b=1, c=c, h=h, hkv=hkv, d=8, **kw)


BAD = [
    (_raw("zigzag", 3), "ValueError", r"not divisible by 8 .*pad it by 4 tokens"),
    (_raw("ulysses", 4, h=6, hkv=6), "ValueError", r"6 query heads do not divide over 4 ranks"),
    (_raw("ulysses", 4, h=4, hkv=3), "ValueError", "heads not divisible"),
    (_raw("ulysses", 4, h=8, hkv=8, group=None) | {"h": 12, "hkv": 6}, "ValueError", "kv heads .*neither divide"),
    (_raw("zigzag", 4, layout="striped"), "ValueError", "layout mismatch: strategy 'zigzag' runs on the 'zigzag'"),
    (_raw("striped", 4, position_ids=torch.arange(4)), "ValueError", "layout mismatch: the position ids"),
    (_raw("ring", 4, device="meta"), "ValueError", r"q is on meta but the process group communicates cpu"),
    (_raw("hybrid", 4), "ValueError", "strategy 'hybrid' needs group=context_mesh"),
    (_raw("spiral", 4), "ValueError", "unknown strategy 'spiral'"),
    (_raw("ring", 4, window=0), "ValueError", "window must be None or a positive int"),
    # the layout is never guessed: unstated is an error, and positions that fit no layout are named
    (_raw("allgather", 4, layout=None), "ValueError", "needs to know how q, k, v were sharded: pass layout="),
    (_raw("ring", 4, layout=None, position_ids=torch.arange(4) + 1), "ValueError",
     "follow none of the layouts strategy 'ring' runs on"),
    (_raw("zigzag", 4, layout=None, position_ids=torch.arange(4)), "ValueError",
     r"follow none of the layouts strategy 'zigzag' runs on \(zigzag\)"),
]


def test_bad_input_errors():
    results = run(expect_errors, 4, args=([c for c, _, _ in BAD],), timeout=120)
    assert len(results) == 4
    for rank, per_rank in enumerate(results):  # every rank refuses, with the same message
        for (case, typ, pattern), (got_type, msg) in zip(BAD, per_rank, strict=True):
            assert got_type == typ, (rank, case, got_type, msg)
            assert re.search(pattern, msg), (rank, pattern, msg)


def _unequal(strategy, q_len, kv_len, **kw):
    return ("unequal_shards", dict(strategy=strategy, q_len=q_len, kv_len=kv_len, **kw)), (q_len, kv_len)


UNEQUAL = [
    _unequal("ring", 4, 3),
    _unequal("ulysses", 2, 4),
    _unequal("allgather", 4, 2, layout="zigzag"),
    _unequal("hybrid", 4, 2, layout="striped", mesh=(1, 2)),
]


def test_unequal_shards_are_refused():
    results = run(_error_workers.expect_errors, 2, args=([c for c, _ in UNEQUAL],), timeout=60)
    assert len(results) == 2
    for rank, per_rank in enumerate(results):
        *errors, after = per_rank
        assert after == ("after", "2.0"), (rank, after)
        for (call, (nq, nkv)), (got_type, msg) in zip(UNEQUAL, errors, strict=True):
            assert got_type == "ValueError", (rank, call, got_type, msg)
            assert msg.startswith(f"q has {nq} tokens but k/v have {nkv}: shards must be equally long; shard q, k "
                                  "and v of the same sequence with the same layout"), (rank, call, msg)


def test_no_process_group():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="no process group"):
        attention(q, q, q, strategy="ring", causal=True, layout="contiguous")


def test_local_shape_errors_come_from_the_kernel_contract():
    with pytest.raises(ValueError, match="heads not divisible"):
        attention(torch.randn(1, 4, 3, 8), torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), strategy="ring",
                  layout="contiguous")


def test_strategy_layouts():
    assert strategy_layout("ring") == "contiguous"
    assert strategy_layout("zigzag") == "zigzag"
    assert strategy_layout("allgather") == "zigzag"
    assert strategy_layout("allgather", "striped") == "striped"
    assert strategy_layout("ulysses") == "contiguous"
    with pytest.raises(ValueError, match="unknown layout"):
        strategy_layout("ulysses", "spiral")
    m = ContextParallelAttention("striped", causal=True)
    assert m.layout == "striped" and "striped" in repr(m)


def _random_cases(world, count, rng):
    cases = []
    for _ in range(count):
        strategy = rng.choice(["ring", "zigzag", "striped", "allgather", "ulysses", "hybrid"])
        h = rng.choice([world, 2 * world])
        hkv = rng.choice([h, max(1, h // 2), 1])
        per_rank = 2 * rng.randint(1, 4)
        case = dict(strategy=strategy, b=rng.randint(1, 2), n=per_rank * world, h=h, hkv=hkv, d=rng.choice([4, 8]),
                    causal=rng.random() < 0.6, window=rng.choice([None, None, rng.randint(1, 3 * per_rank)]),
                    seed=rng.randint(0, 1000))
        if strategy == "hybrid":
            case["mesh"] = (world, 1) if world == 3 else (2, world // 2)
            case["layout"] = rng.choice(["contiguous", "zigzag", "striped"])
            case["window"] = None
        if strategy == "ulysses" and h % world:
            case["h"] = world
        cases.append(case)
    return cases


@pytest.mark.parametrize("world,count", [(2, 70), (3, 60), (4, 70)])
def test_200_random_calls_no_hang(world, count):
    cases = _random_cases(world, count, random.Random(world))
    check(cases, launch(cases, world, timeout=600), world)


def test_batched_position_ids_are_accepted():
    from longctx.parallel.sequence.api import check_positions as _check_positions

    expected = torch.tensor([2, 3, 12, 13])
    _check_positions(expected, expected)
    _check_positions(expected.expand(3, 4), expected)
    with pytest.raises(ValueError, match="layout mismatch"):
        _check_positions(torch.stack([expected, expected + 1]), expected)


def test_shards_cut_by_torch_chunk_are_recognised_from_their_positions():
    # the silent-mismatch case of a new user: contiguous (torch.chunk) shards, allgather/ulysses/hybrid
    # called without layout=; the positions name the layout, and the result is exact
    cases = [dict(strategy=s, b=1, n=32, h=4, hkv=2, d=8, causal=True, layout="contiguous", pass_layout=False)
             for s in ("allgather", "ulysses")]
    cases.append(dict(strategy="hybrid", mesh=(2, 2), b=1, n=32, h=4, hkv=2, d=8, causal=True, layout="striped",
                      pass_layout=False))
    # positions one rank holds under two layouts (hybrid contiguous's first rank: zigzag's too; allgather's
    # rank 1 of 3 under striped: zigzag's too): that rank chose the first in the list, the others the
    # right one, and the answer was off by 1.1 without an error; the ranks now agree on one
    cases.append(dict(strategy="hybrid", mesh=(2, 2), b=1, n=16, h=4, hkv=2, d=8, causal=True, layout="contiguous",
                      pass_layout=False))
    check(cases, launch(cases, 4), 4)
    three = [dict(strategy="allgather", b=1, n=6, h=2, hkv=2, d=8, causal=True, layout="striped", pass_layout=False)]
    check(three, launch(three, 3), 3)


def test_a_refused_kernel_leaves_the_group_usable():
    """kernel= checked before any transfer; a kernel raising inside the ring loop (forward or backward) lets
    the transfers in flight complete first: the next call on the group runs (pg_timeout short, so a
    dangling send shows as a timeout, not a hang)."""
    for ended in run(_error_workers.refusals_leave_the_group_usable, 2, timeout=120, pg_timeout=15):
        assert ended == ["unknown kernel backend 'bogus'", "this backend refuses", "this backend refuses", "ok"], ended

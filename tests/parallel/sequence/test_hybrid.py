import re

import pytest
import torch

from longctx.launch import run
from longctx.parallel import comm_model, context_mesh, get_strategy, hybrid_positions

from . import _error_workers
from ._cases import check, launch


def _cases(ring, uly, dtype=torch.float32, **extra):
    world = ring * uly
    h = 2 * uly
    cases = []
    for layout in ("contiguous", "zigzag", "striped"):
        for causal in (False, True):
            for hkv in (h, uly, 1):
                cases.append(dict(strategy="hybrid", mesh=(ring, uly), layout=layout, b=2, n=8 * world, h=h,
                                  hkv=hkv, d=8, causal=causal, window=None, dtype=dtype, **extra))
    return cases


@pytest.mark.parametrize("ring,uly", [(1, 1), (1, 2), (2, 1), (3, 1), (2, 2), (4, 2), (2, 4)])
def test_hybrid_exact(ring, uly):
    cases = _cases(ring, uly)
    # windows over each head split: MHA, kv heads = the ulysses degree, and MQA (causal and not)
    cases += [dict(c, window=5) for c in cases[2:6]]
    check(cases, launch(cases, ring * uly), ring * uly)


def test_hybrid_bf16():
    cases = [c for c in _cases(2, 2, torch.bfloat16, bf16_baseline=True) if c["causal"]][:3]
    check(cases, launch(cases, 4), 4)


_FACTOR = r"world size 4 does not factor as ring {} x ulysses {}; choose degrees whose product is 4"
_HEADS = r"hybrid ulysses: {} query heads do not divide over 2 ranks; use a hybrid ulysses degree that divides the " \
    r"heads \(e.g. {}\)"
MESH_ERRORS = [  # at W=4
    (("make_mesh", dict(ring=3, ulysses=2)), _FACTOR.format(3, 2)),
    (("make_mesh", dict(ring=1, ulysses=2)), _FACTOR.format(1, 2)),
    (("make_mesh", dict(ring=0, ulysses=4)), r"ring degree must be a positive int, got 0"),
    (("make_mesh", dict(ring=2.0, ulysses=2)), r"ring degree must be a positive int, got 2\.0"),
    (("make_mesh", dict(ring=4, ulysses=True)), r"ulysses degree must be a positive int, got True"),
    # the heads must split over the ulysses degree (2 of the 2 x 2 mesh), not over the 4 ranks
    (("hybrid_heads", dict(mesh=(2, 2), h=3, hkv=1)), _HEADS.format(3, 1)),
    (("hybrid_heads", dict(mesh=(2, 2), h=6, hkv=3)),
     r"hybrid ulysses: 3 kv heads \(model.n_kv_heads, per tensor-parallel rank\) neither divide over 2 ranks nor "
     r"replicate evenly onto them; use a hybrid ulysses degree that divides the kv heads or is a multiple of them"),
]


def test_mesh_and_heads_errors():
    results = run(_error_workers.expect_errors, 4, args=([c for c, _ in MESH_ERRORS],), timeout=60)
    assert len(results) == 4
    for rank, per_rank in enumerate(results):
        *errors, after = per_rank
        assert after == ("after", "4.0"), (rank, after)
        for (call, pattern), (got_type, msg) in zip(MESH_ERRORS, errors, strict=True):
            assert got_type == "ValueError", (rank, call, got_type, msg)
            assert re.search(pattern, msg), (rank, call, pattern, msg)


def test_ulysses_degree_errors():
    """The degree checks that need no process group: the models, the strategy check, the positions."""
    divide = r"hybrid: ulysses degree 3 does not divide the 4 context ranks; pick a ulysses degree that divides 4"
    with pytest.raises(ValueError, match=divide):
        comm_model("hybrid", world=4, batch=1, seq_len=16, heads=6, kv_heads=6, head_dim=8, dtype_bytes=4,
                   ulysses=3)
    with pytest.raises(ValueError, match=divide):
        get_strategy("hybrid").check(seq_len=None, world=4, layout="zigzag", ulysses=3)
    with pytest.raises(ValueError, match=r"a ulysses degree \(2\) only applies to strategy 'hybrid', not 'ring'; "
                       r"set ulysses=1 or strategy='hybrid'"):
        get_strategy("ring").check(seq_len=16, world=4, layout="contiguous", ulysses=2)
    with pytest.raises(ValueError, match=r"hybrid ulysses: 3 query heads do not divide over 2 ranks"):
        comm_model("hybrid", world=4, batch=1, seq_len=16, heads=3, kv_heads=3, head_dim=8, dtype_bytes=4,
                   ulysses=2)
    # ring 2 x ulysses 2 over zigzag: the sequence must be a multiple of lcm(2 x 2 chunks, 4 ranks) = 4
    with pytest.raises(ValueError, match=r"sequence length 10 is not divisible by 4 \(strategy 'hybrid' with the "
                       r"zigzag layout over 4 context ranks needs a multiple of 4\); pad it by 2 tokens to 12"):
        hybrid_positions("zigzag", 10, 2, 2, 0, 0)
    with pytest.raises(RuntimeError, match=r"context_mesh needs an initialised process group"):
        context_mesh(2, 2)


def test_shard_batch_takes_the_hybrid_mesh():
    assert run(_error_workers.hybrid_shard_batch, 4, args=(2, 2), timeout=120) == [True] * 4

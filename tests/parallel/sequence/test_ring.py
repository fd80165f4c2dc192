"""ring, zigzag and striped (one loop, three layouts) against a float64 single-device reference."""

import pytest
import torch

from ._cases import check, grid, launch

RING_FAMILY = ["ring", "zigzag", "striped"]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ring_family_exact(world):
    cases = grid(RING_FAMILY, world)
    # windows crossing shards: every strategy x causal once, rotating through MHA, GQA and MQA
    windowed = grid(RING_FAMILY, world, causals=(True, False), window=5)
    cases += [c for i, c in enumerate(windowed) if i % 3 == (i // 3) % 3]
    cases += [dict(c, kernel="reference") for c in grid(["zigzag"], world, causals=(True,))[:1]]
    check(cases, launch(cases, world), world)


def test_ring_family_bf16():
    cases = [dict(c, bf16_baseline=True) for c in grid(RING_FAMILY, 4, causals=(True,), dtype=torch.bfloat16)]
    results = launch(cases, 4)
    check(cases, results, 4)
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases, per_rank, strict=True):
            assert (r["out_dtype"], r["grad_dtype"]) == ("torch.bfloat16", "torch.bfloat16"), (rank, case, r)


def test_error_does_not_grow_with_world_size():
    """Same global problem at W = 1, 2, 4, 8: every strategy's fp32 error stays at the single-device level."""
    strategies = ["ring", "zigzag", "striped", "allgather", "ulysses"]
    errs = {}
    for world in (1, 2, 4, 8):
        cases = [dict(strategy=s, b=1, n=64, h=8, hkv=8, d=16, causal=True, window=None, seed=3) for s in strategies]
        res = launch(cases, world)
        for i, s in enumerate(strategies):
            errs[s, world] = max(max(r[i][k] for k in ("err_out", "err_dq", "err_dk", "err_dv")) for r in res)
    for s in strategies:
        per_w = {w: errs[s, w] for w in (1, 2, 4, 8)}
        assert max(per_w.values()) <= 1e-5, (s, per_w)
        assert max(per_w.values()) <= 4 * per_w[1] + 2e-7, (s, per_w)


@pytest.mark.parametrize("world", [2])
def test_ring_family_with_triton_kernel(world, triton_env):
    """Our Triton kernel under every ring-family schedule (the interpreter on CPU: tiny shapes), with the
    opt-in environment handed to the rank processes only. One world size, the smallest with every block
    kind (zigzag's causal, q x k[:h] and q[h:] x k; striped's shifted causal; skipped blocks): the blocks
    (4 rows) are already smaller than a tile, and larger and odd world sizes are the schedules' business,
    tested with every kernel above."""
    env = triton_env()
    base = dict(b=1, n=8 * world, h=2, hkv=1, d=16, kernel="triton")
    cases = [dict(base, strategy=s, causal=c, window=w)
             for s in RING_FAMILY for c, w in ((True, None), (False, None), (True, 5), (False, 3))]
    cases += [dict(base, strategy=s, causal=True, window=None, dtype=torch.bfloat16, bf16_baseline=True)
              for s in RING_FAMILY]
    cases += [dict(base, strategy="allgather", causal=True, window=None)]
    # values narrower and wider than q/k, each width in the kernels' own tiles (no zero padding)
    cases += [dict(base, strategy="zigzag", causal=True, window=None, dv=dv) for dv in (8, 24)]
    check(cases, launch(cases, world, env=env), world)

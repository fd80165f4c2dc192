"""Attention sinks (gpt-oss): one zero-valued key per head with a learned logit in every row's softmax,
merged once into each schedule's global out/lse. Every strategy against the float64 oracle (which adds the
sink to its explicit normaliser): outputs, q/k/v gradients, and the sinks' own gradient summed over ranks."""

import pytest
import torch

from longctx.parallel.sequence.schedule import local_attention

from ._cases import TOL_FP32, check, grid, launch


def test_every_strategy_with_sinks():
    world = 4
    cases = grid(["ring", "zigzag", "striped", "allgather", "ulysses"], world, sinks=True)
    cases += [dict(c, window=5) for c in cases if c["causal"] and c["hkv"] == 2]
    cases += [dict(strategy="hybrid", mesh=(2, 2), layout="zigzag", b=2, n=32, h=4, hkv=hkv, d=8, causal=True,
                   sinks=True) for hkv in (4, 1)]
    results = launch(cases, world)
    check(cases, results, world)
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases, per_rank):
            assert r["err_dsinks"] <= TOL_FP32, (rank, case, r["err_dsinks"])


def test_sinks_change_the_result_and_are_checked():
    # a sink takes weight from every row (so the comparisons above could fail if it were dropped)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g) for _ in range(3))
    plain = local_attention(q, k, v, causal=True, window=None, kernel="reference", documents=None)
    sunk = local_attention(q, k, v, causal=True, window=None, kernel="reference", documents=None,
                           sinks=torch.zeros(2))
    assert (plain - sunk).abs().max() > 0.05
    with pytest.raises(ValueError, match=r"sinks must be a tensor of one logit per query head, shape \(2,\), got "
                                         r"\(4,\)"):
        local_attention(q, k, v, causal=True, window=None, kernel="reference", documents=None, sinks=torch.zeros(4))
    for sinks, words in ((torch.zeros(2, dtype=torch.long), r"sinks has dtype torch.int64; the logits must be floats"),
                         (torch.zeros(2, device="meta"), r"sinks is on meta but q is on cpu; move it with "
                                                         r"sinks.to\(q.device\)")):
        with pytest.raises((TypeError, ValueError), match=words):
            local_attention(q, k, v, causal=True, window=None, kernel="reference", documents=None, sinks=sinks)

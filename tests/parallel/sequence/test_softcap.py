"""Logit soft-capping (Gemma 2): every score s becomes c tanh(s / c) before the mask and the softmax. The
kernels cap each block's scores alike, so every schedule's merge and its backward with the global out/lse
stay exact: each strategy against the float64 oracle (which caps its dense scores and lets autograd
differentiate the tanh), outputs and q/k/v gradients."""

import pytest
import torch

from longctx import kernels
from longctx.parallel.sequence.schedule import local_attention

from ._cases import check, grid, launch

CAP = 1.0  # the scores are ~N(0, 1): a cap of 1 bends most of them


def test_every_strategy_with_soft_capping():
    world = 4
    # the reference kernel by name: auto would pick it too on CPU (sdpa does not cap), and check() asserts
    # that exactly the named backend ran
    cases = grid(["ring", "zigzag", "striped", "allgather", "ulysses"], world, causals=(True,), softcap=CAP,
                 kernel="reference")
    cases += [dict(c, window=5) for c in cases if c["hkv"] == 2]
    cases += [dict(strategy="zigzag", b=2, n=32, h=4, hkv=2, d=8, causal=False, softcap=CAP, kernel="reference")]
    cases += [dict(strategy="hybrid", mesh=(2, 2), layout="zigzag", b=2, n=32, h=4, hkv=hkv, d=8, causal=True,
                   softcap=CAP, kernel="reference") for hkv in (4, 1)]
    check(cases, launch(cases, world), world)


def test_soft_capping_changes_the_result_and_picks_a_backend_that_computes_it():
    # the cap bends the result (so the comparisons above could fail if it were dropped); auto skips sdpa,
    # which cannot cap, and a backend named for a capped call that cannot compute it is refused by name
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, 2, 4, generator=g) for _ in range(3))
    plain = local_attention(q, k, v, causal=True, window=None, kernel="auto", documents=None)
    kernels.reset_calls()
    capped = local_attention(q, k, v, causal=True, window=None, kernel="auto", documents=None, softcap=0.5)
    assert (plain - capped).abs().max() > 0.05
    assert set(kernels.backends_ran()) == {"reference"}
    with pytest.raises(ValueError, match="kernel backend 'sdpa' cannot run this call: it does not compute logit "
                                         "soft-capping; use kernel='auto' or 'reference'"):
        local_attention(q, k, v, causal=True, window=None, kernel="sdpa", documents=None, softcap=0.5)
    # 0 and None mean no cap (transformers' convention): sdpa then runs as before
    kernels.reset_calls()
    same = local_attention(q, k, v, causal=True, window=None, kernel="auto", documents=None, softcap=0)
    assert torch.equal(same, plain) and set(kernels.backends_ran()) == {"sdpa"}
    for bad in (-1.0, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ValueError, match=r"softcap must be None or a positive finite float \(scores become "
                                             r"softcap \* tanh\(score / softcap\)\), got"):
            kernels.forward(q, k, v, softcap=bad)


def test_a_backend_registered_without_soft_capping_keeps_its_signature():
    # a backend of a user's own (forward/backward without softcap=) still runs uncapped calls, and auto never
    # hands it a capped one even at the highest priority
    ref = kernels.backends()["reference"]
    seen = []

    def fwd(q, k, v, *, scale, mask, out_dtype=None):
        seen.append("fwd")
        return ref.forward(q, k, v, scale=scale, mask=mask, out_dtype=out_dtype)

    kernels.register(kernels.Backend("mine", fwd, ref.backward, priority=99))
    try:
        q = torch.randn(1, 4, 2, 8)
        kernels.forward(q, q, q, mask="causal")
        assert seen == ["fwd"]
        kernels.reset_calls()
        kernels.forward(q, q, q, mask="causal", softcap=2.0)
        assert seen == ["fwd"] and set(kernels.backends_ran()) == {"reference"}
    finally:
        kernels.unregister("mine")

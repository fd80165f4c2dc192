"""LongNet dilated attention: single device against an independent dense multiset-softmax reference,
distributed against the same reference, byte counters against the hand-derived formula (_hand_bytes; the
product's dilated_comm_model is pinned to the same formula in test_hand_bytes), and bad input."""

import re

import pytest
import torch

from longctx.launch import run
from longctx.parallel.sequence.dilated import (
    DilatedAttention,
    check_pattern,
    dilated_attention,
    dilated_comm_model,
    dilated_config,
)
from tests.support.backends import check_ran

from ._dilated_workers import problem, reference_with_grads, run_cases
from ._hand_bytes import expected_dilated

PATTERNS = [
    ([4, 8, 16, 64], [1, 1, 2, 4]),  # local (w < l, w = l) and gathered (w > l), last one cut to N
    ([8, 32], [2, 4]),               # no rate-1 pattern: rows some heads never see stay 0
    ([2, 4, 16], [1, 2, 8]),         # rate above the head count: residues no head takes
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 3), (6, 2), (4, 1), (2, 2)])
def test_single_device_matches_dense_reference(causal, heads):
    h, hkv = heads
    for pi, (ws, rs) in enumerate(PATTERNS):
        q, k, v, do = problem(2, 32, h, hkv, 8, seed=pi)
        ref_out, ref_grads = reference_with_grads(q, k, v, do, ws, rs, causal)
        for dtype, tol_out, tol_grad in ((torch.float64, 1e-12, 1e-8), (torch.float32, 1e-5, 1e-5)):
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            out = dilated_attention(*leaves, segment_lengths=ws, dilation_rates=rs, causal=causal)
            out.backward(do.to(dtype))
            assert out.dtype == dtype and leaves[0].grad.dtype == dtype
            assert (out.double() - ref_out).abs().max() <= tol_out, (ws, rs, dtype)
            for t, g in zip(leaves, ref_grads):
                assert (t.grad.double() - g).abs().max() <= tol_grad, (ws, rs, dtype)


def test_lse_and_uncovered_rows():
    q, k, v, _ = problem(1, 16, 2, 2, 4, seed=1)
    out, lse = dilated_attention(q, k, v, segment_lengths=[8], dilation_rates=[4], return_lse=True)
    # head 0 covers rows 0, 4, 8, 12 only; the others stay exactly 0 with lse -inf (no sentinel)
    covered = torch.zeros(16, dtype=torch.bool)
    covered[0::4] = True
    assert torch.isneginf(lse[0, 0, ~covered]).all() and torch.isfinite(lse[0, 0, covered]).all()
    assert (out[0, ~covered, 0] == 0).all()
    # a row whose true logsumexp is 0 is covered (torchscale's lse == 0 test would drop it)
    z = torch.zeros(1, 4, 1, 4, dtype=torch.float64)
    o, l0 = dilated_attention(z, z, z + 1, segment_lengths=[1], dilation_rates=[1], return_lse=True)
    assert (l0 == 0).all() and (o == 1).all()


def _dist_cases(world):
    cases = []
    for causal in (False, True):
        for hkv in (4, 2, 1):
            cases.append(dict(b=2, l=8, h=4, hkv=hkv, d=8, ws=PATTERNS[0][0], rs=PATTERNS[0][1], causal=causal))
        cases.append(dict(b=1, l=8, h=2, hkv=1, d=8, ws=PATTERNS[1][0], rs=PATTERNS[1][1], causal=causal))
    cases.append(dict(b=1, l=8, h=4, hkv=2, d=8, ws=[4, 16, 32], rs=[1, 2, 4], causal=True, dtype=torch.float64))
    cases.append(dict(b=2, l=8, h=4, hkv=4, d=8, ws=[4, 16], rs=[1, 2], causal=True, weak=True))
    # GQA de-duplication on the wire: a gathered rate-1 pattern (4 query heads read 2 kv heads: 2 sent,
    # not 4), and H=6, H_kv=2, r=2, where class 0 reads kv heads [0, 0, 1]: 2 sent and expanded after the
    # gather, because the kernel's GQA mapping cannot read [0, 1] for 3 query heads
    cases.append(dict(b=2, l=8, h=4, hkv=2, d=8, ws=[4, 16], rs=[1, 1], causal=False))
    for causal in (False, True):
        cases.append(dict(b=2, l=8, h=6, hkv=2, d=8, ws=[4, 16, 64], rs=[1, 2, 4], causal=causal))
    if world == 8:  # two context groups of 4 in a world of 8: segment sub-groups of a sub-group
        cases.append(dict(b=1, l=8, h=4, hkv=2, d=8, ws=[4, 16, 32], rs=[1, 2, 4], causal=True, context=4))
        cases.append(dict(b=1, l=8, h=4, hkv=2, d=8, ws=[4, 16, 32], rs=[1, 2, 4], causal=False, context=4))
    return cases


@pytest.mark.parametrize("world", [2, 4, 8])
def test_distributed_matches_reference(world):
    cases = _dist_cases(world)
    results = run(run_cases, world, args=(cases,), timeout=240.0)
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases, per_rank):
            label = (world, rank, case, r)
            dtype = case.get("dtype", torch.float32)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert r["err_out"] <= tol and r["err_grad"] <= tol, label
            assert r["dtypes"] == [str(dtype)] * 4, label  # out, dq, dk, dv in the input dtype, every rank
            check_ran(r["backends"], "auto", label=label)
            want = _hand(case, r["world"], r["n"], dtype)
            for key in ("fwd_bytes", "fwd_calls", "bwd_bytes", "bwd_calls"):
                assert r[key] == want[key], (key, want, label)
            if case.get("weak"):
                # N and W doubled together: the same bytes per rank as at W=2 (and some are moved at all)
                at2 = _hand(case, 2, 2 * case["l"], dtype)
                assert r["fwd_bytes"] == at2["fwd_bytes"] > 0 and r["bwd_bytes"] == at2["bwd_bytes"], label


def _hand(case, world, n, dtype):
    return expected_dilated(world=world, batch=case["b"], seq_len=n, heads=case["h"], kv_heads=case["hkv"],
                            head_dim=case["d"], dtype_bytes=torch.tensor([], dtype=dtype).element_size(),
                            segment_lengths=case["ws"], dilation_rates=case["rs"])


def test_comm_model_is_weak_scaling_and_gathers_only_segments():
    m = [dilated_comm_model(w, 1, 4096 * w, 8, 64, 2, [1024, 8192, 65536], [1, 4, 16]) for w in (16, 32, 64)]
    assert m[0] == m[1] == m[2]
    # a segment of 2 ranks: one rank's sparse K+V, once (bf16 forward, fp32 backward)
    one = dilated_comm_model(4, 1, 4 * 4096, 8, 64, 2, [8192], [4])
    assert one == {"fwd_bytes": 2 * 1024 * 8 * 64 * 2, "fwd_calls": 1, "bwd_bytes": 2 * 1024 * 8 * 64 * 4,
                   "bwd_calls": 1}
    assert dilated_comm_model(4, 1, 4 * 4096, 8, 64, 2, [4096], [1])["fwd_bytes"] == 0  # local only


@pytest.mark.parametrize("args, match", [
    (([4, 6], [1, 2], 24), "segment_lengths must be geometric"),
    (([4, 8], [1], 16), "one dilation rate per segment length"),
    (([6], [1], 16), "does not divide the sequence length 16; pad the sequence to 18"),
    (([4, 8], [1, 3], 16), r"dilation_rates\[1\]=3 does not divide segment length 8"),
    (([32], [5], 16), r"cut to the sequence length"),
    (([8], [1], 24, 2), "local length 12 .* not a multiple of segment_lengths"),
    (([4, 16], [1, 2], 48, 4), "not a multiple of the local length 12"),
    (([4, 16], [1, 8], 16, 4), r"local length 4 is not a multiple of dilation_rates\[1\]=8"),
    (([], [], 16), "non-empty list of positive ints"),
    (([4, 0], [1, 1], 16), "segment_lengths must be a non-empty list of positive ints"),
    (([4, 8], [1, 2.0], 16), "dilation_rates must be"),
    # the length to pad to passes every check (20 is a multiple of 4, but 5 tokens a rank splits a segment of 4)
    (([4], [1], 18, 4), "not divisible by the world size 4; pad it to 32 tokens"),
])
def test_bad_patterns(args, match):
    with pytest.raises(ValueError, match=match):
        check_pattern(*args)
    suggested = re.search(r"to (\d+) tokens", str(check_pattern_error(args)))
    if suggested:
        check_pattern(args[0], args[1], int(suggested.group(1)), *args[3:])


def check_pattern_error(args) -> ValueError:
    try:
        check_pattern(*args)
    except ValueError as e:
        return e
    raise AssertionError(f"{args} passed")


def test_bad_calls():
    q = torch.randn(1, 16, 4, 8)
    with pytest.raises(ValueError, match="segment_lengths must be geometric"):
        dilated_attention(q, q, q, segment_lengths=[4, 6], dilation_rates=[1, 2])
    with pytest.raises(ValueError, match="equal lengths"):
        dilated_attention(q, q[:, :8], q[:, :8], segment_lengths=[4], dilation_rates=[1])
    with pytest.raises(ValueError, match="heads not divisible"):
        dilated_attention(q, q[:, :, :3], q[:, :, :3], segment_lengths=[4], dilation_rates=[1])
    with pytest.raises(ValueError, match="one dilation rate per segment length"):
        DilatedAttention([4, 8], [1])


def test_config_and_module():
    assert dilated_config(16384, w0=2048) == ([2048, 4096, 8192, 16384], [1, 2, 4, 8])
    assert dilated_config(16384, w0=2048, alpha=4, levels=2) == ([2048, 8192], [1, 4])
    assert dilated_config(1000, w0=2048) == ([1000], [1])
    attn = DilatedAttention.geometric(32, w0=4, causal=True)
    q, k, v, _ = problem(1, 32, 4, 2, 8, seed=3)
    ws, rs = dilated_config(32, w0=4)
    ref, _ = reference_with_grads(q, k, v, q, ws, rs, True)
    assert (attn(q, k, v) - ref).abs().max() <= 1e-12
    assert "segment_lengths=[4, 8, 16, 32]" in repr(attn)


def test_a_narrower_v_is_refused_where_a_pattern_spans_ranks():
    """A gathered pattern moves K and V in one stacked buffer: v of another width is refused by name (it was
    torch.stack's size error); patterns inside a rank's chunk take it."""
    from . import _error_workers

    calls = [("dilated_narrow_v", dict(segment_lengths=[16], dilation_rates=[2])),
             ("dilated_narrow_v", dict(segment_lengths=[4, 8], dilation_rates=[1, 2]))]
    for spans, inside, after in run(_error_workers.expect_errors, 2, args=(calls,), timeout=60):
        assert spans == ("ValueError", "v's head width 3 differs from q/k's 4, which dilated attention takes only for "
                                       "patterns inside one rank's chunk; these patterns span ranks: use segment "
                                       "lengths within a rank's chunk, or v of q's width"), spans
        assert inside == ("no error", "") and after == ("after", "2.0")

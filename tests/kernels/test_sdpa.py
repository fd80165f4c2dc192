import itertools

import pytest
import torch

from longctx import kernels
from longctx.kernels import Mask, sdpa
from longctx.kernels.sdpa import pieces
from tests.support import oracle
from tests.support.backends import check_ran, report

MASKS = [Mask.none(), Mask.causal(), Mask.shifted_causal()] + [Mask.causal(offset=o) for o in range(-9, 10)] + \
    [Mask(right=r, offset=o) for r in (-2, 1, 3) for o in (-2, 0, 2)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.kind)
def test_pieces_cover_the_mask_with_square_triangles(mask):
    """Square causal pieces mean the same under top-left (CPU op) and bottom-right (CUDA op) alignment."""
    for sq, sk in itertools.product(range(1, 8), range(1, 8)):
        got = torch.zeros(sq, sk, dtype=torch.int)
        for q0, q1, k0, k1, causal in pieces(mask, sq, sk):
            assert q1 > q0 and k1 > k0
            blk = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
            if causal:
                assert q1 - q0 == k1 - k0
                blk = blk.tril()
            got[q0:q1, k0:k1] += blk.int()
        assert got.max() <= 1 and torch.equal(got.bool(), oracle.allowed(sq, sk, **oracle.band(mask))[0]), (sq, sk)


def test_pieces_are_as_few_as_the_mask_allows():
    """A square causal block is one fused call (no merge); more keys than queries add the rectangle of keys
    every row sees; more queries than keys, only rows that see nothing are left out."""
    for n in range(1, 8):
        assert pieces(Mask.causal(), n, n) == [(0, n, 0, n, True)]
        assert pieces(Mask.causal(), n, n + 3) == [(0, n, 0, 3, False), (0, n, 3, n + 3, True)]
        assert pieces(Mask.causal(), n + 2, n) == [(2, n + 2, 0, n, True)]
    assert pieces(Mask.causal(offset=5), 4, 4) == [(0, 4, 0, 4, False)]  # every row sees every key


def test_masks_the_op_cannot_cut_go_dense_or_fall_back():
    assert pieces(Mask.sliding_window(3), 4, 4) is None
    assert pieces(Mask.documents(torch.zeros(1, 4, dtype=torch.long)), 4, 4) is None


@pytest.mark.parametrize("mask", [Mask.causal(-2), Mask.sliding_window(3),
                                  Mask.documents(torch.tensor([[0, 0, 1, 1, 1]]))], ids=lambda m: m.kind)
def test_sdpa_runs_the_fused_op_not_reference(mask, monkeypatch):
    """sdpa's CPU path goes through the aten flash op for every mask kind (a window or documents as an
    additive mask), and never through reference: a spy counts the op calls, the registry the backends."""
    seen = {"fwd": 0, "bwd": 0}
    op_f, op_b = sdpa._op_forward, sdpa._op_backward
    monkeypatch.setattr(sdpa, "_op_forward", lambda *a: seen.__setitem__("fwd", seen["fwd"] + 1) or op_f(*a))
    monkeypatch.setattr(sdpa, "_op_backward", lambda *a: seen.__setitem__("bwd", seen["bwd"] + 1) or op_b(*a))
    monkeypatch.setattr(kernels.reference, "forward", None)  # any call into reference would now crash
    monkeypatch.setattr(kernels.reference, "backward", None)
    q, k, v = (torch.randn(1, 5, 2, 8, requires_grad=True) for _ in range(3))
    kernels.reset_calls()
    out = kernels.attention(q, k, v, mask=mask, backend="sdpa")
    out.sum().backward()
    check_ran(report(), "sdpa")
    assert seen["fwd"] >= 1 and seen["bwd"] >= 1
    want, _, grads = oracle.attention(q, k, v, do=torch.ones_like(q), **oracle.band(mask))
    assert (out.double() - want).abs().max() <= 1e-5 and (q.grad.double() - grads[0]).abs().max() <= 1e-5


def test_sdpa_fallback_is_counted_when_expected(monkeypatch):
    """A window mask too large to materialise falls back to reference, and says so by reason."""
    monkeypatch.setattr(sdpa, "DENSE_MASK_LIMIT", 10)
    q, k, v = (torch.randn(1, 6, 2, 8) for _ in range(3))
    kernels.reset_calls()
    out, lse = kernels.forward(q, k, v, mask=Mask.sliding_window(2), backend="sdpa")
    kernels.backward(torch.ones_like(q), q, k, v, out, lse, mask=Mask.sliding_window(2), backend="sdpa")
    check_ran(report(), "sdpa", fallbacks={"cpu-mask-size": 2})
    want, _ = oracle.attention(q, k, v, left=1, right=0)
    assert (out.double() - want).abs().max() <= 1e-5


def test_the_cudnn_backend_binds_to_torchs_op_schema_and_is_never_auto(monkeypatch):
    """Its CUDA path has not run on a GPU yet: here its calls go through the ops' meta kernels (the same
    argument parsing, shapes from torch's own meta registration), and `auto` must not pick it."""
    b, h, sq, sk, d = 2, 3, 5, 7, 16
    q = torch.empty(b, h, sq, d, device="meta", dtype=torch.bfloat16)
    k = v = torch.empty(b, h, sk, d, device="meta", dtype=torch.bfloat16)
    out, lse = sdpa.cudnn_forward(q, k, v, True, 0.25)
    assert out.shape == (b, h, sq, d) and lse.shape == (b, h, sq) and lse.dtype == torch.float32
    dq, dk, dv = sdpa.cudnn_backward(out, q, k, v, out, lse, True, 0.25)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    be = kernels.backends()["cudnn"]
    if not torch.cuda.is_available():
        assert "CUDA" in be.availability()
    monkeypatch.setattr(be, "availability", lambda: None)
    x = torch.randn(1, 4, 2, 16, dtype=torch.bfloat16)
    assert kernels.registry.resolve("auto", x, x, x, Mask.causal()).name != "cudnn"
    assert kernels.registry.resolve("cudnn", x, x, x, Mask.causal()).name == "cudnn"

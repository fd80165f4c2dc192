"""The conformance test every registered kernel backend must pass (against a float64 reference)."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx.kernels import Mask, backend_status, backends, backward, forward, merge

BACKENDS = [n for n in sorted(backends()) if backend_status()[n] is None]
# The Triton interpreter is slow on CPU: fewer, smaller examples, same assertions.
EXAMPLES = {"triton": 25}
HEAD_DIMS = {"triton": [16, 32]}


def _mask(draw, kind, b, sq, sk):
    if kind == "none":
        return Mask.none()
    if kind == "causal":
        return Mask.causal()
    if kind == "causal_offset":
        return Mask.causal(offset=draw(st.integers(-sq, sk)))
    if kind == "shifted":
        return Mask.shifted_causal()
    if kind == "window":
        return Mask.sliding_window(draw(st.integers(1, sk + 1)), causal=draw(st.booleans()))
    ndoc = draw(st.integers(1, 3))
    qd = torch.randint(0, ndoc, (b, sq)).sort(-1).values
    kd = torch.randint(0, ndoc, (b, sk)).sort(-1).values
    return Mask.documents(qd, kd, causal=draw(st.booleans()))


@st.composite
def cases(draw, backend):
    b = draw(st.integers(1, 2))
    sq = draw(st.integers(1, 20))
    sk = draw(st.integers(1, 20))
    hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from(HEAD_DIMS.get(backend, [8, 16])))
    kind = draw(st.sampled_from(["none", "causal", "causal_offset", "shifted", "window", "documents"]))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    mask = _mask(draw, kind, b, sq, sk)
    return b, sq, sk, hkv, g, d, mask, dtype


def _tensors(b, sq, sk, hkv, g, d, dtype):
    q = torch.randn(b, sq, hkv * g, d).to(dtype)
    k = torch.randn(b, sk, hkv, d).to(dtype)
    v = torch.randn(b, sk, hkv, d).to(dtype)
    do = torch.randn(b, sq, hkv * g, d).to(dtype)
    return q, k, v, do


def _err(a, b):
    a, b = a.double(), b.double()
    same_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return diff.max().item() if diff.numel() else 0.0


def _run(backend, q, k, v, do, mask):
    out, lse = forward(q, k, v, mask=mask, backend=backend)
    grads = backward(do, q, k, v, out, lse, mask=mask, backend=backend)
    return out, lse, grads


def _check(backend, case):
    b, sq, sk, hkv, g, d, mask, dtype = case
    q, k, v, do = _tensors(b, sq, sk, hkv, g, d, dtype)
    out, lse, grads = _run(backend, q, k, v, do, mask)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, hkv * g, sq)
    assert all(x.dtype == dtype for x in grads)
    assert not out.isnan().any() and not lse.isnan().any() and not any(x.isnan().any() for x in grads)
    r_out, r_lse, r_grads = _run("reference", q.double(), k.double(), v.double(), do.double(), mask)
    # rows with no allowed key: exactly out = 0 and lse = -inf
    empty = torch.isneginf(r_lse)
    assert torch.equal(torch.isneginf(lse), empty)
    assert (out.transpose(1, 2)[empty] == 0).all()
    errs = [_err(out, r_out), _err(lse, r_lse)] + [_err(x, y) for x, y in zip(grads, r_grads)]
    if dtype == torch.float32:
        assert max(errs) <= 1e-5, (mask, errs)
    else:
        # bf16: twice the reference backend's own bf16 error, plus 2^-6 of the largest exact value. The slack
        # is what FlashAttention-style kernels lose by rounding P and dS to bf16 (2^-8 relative per element,
        # summed over keys); a wrong mask, offset or scale is off by O(1) and still fails.
        ref = _run("reference", q, k, v, do, mask)
        ref_errs = [_err(ref[0], r_out), _err(ref[1], r_lse)] + [_err(x, y) for x, y in zip(ref[2], r_grads)]
        scale = [r_out.abs().max().item()] + [1.0] + [t.abs().max().item() for t in r_grads]
        for e, re, s in zip(errs, ref_errs, scale):
            assert e <= 2 * re + 2**-6 * max(s, 1e-3), (mask, errs, ref_errs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conformance(backend):
    @settings(max_examples=EXAMPLES.get(backend, 60), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(cases(backend))
    def inner(case):
        _check(backend, case)

    inner()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["none", "causal"])
def test_backward_with_global_out_lse(backend, kind):
    """Block backward with the merged (global) out/lse sums to the full gradient: what ring needs."""
    torch.manual_seed(0)
    d = HEAD_DIMS.get(backend, [16])[-1]
    q, k, v, do = _tensors(2, 12, 12, 2, 2, d, torch.float32)
    full = Mask.causal() if kind == "causal" else Mask.none()
    out, lse = forward(q, k, v, mask=full, backend="reference")
    ref = backward(do, q, k, v, out, lse, mask=full, backend="reference")
    # two key blocks [0, 5) and [5, 12) with the same global rule re-expressed on each block
    m1, m2 = full.sub(0, 12, 0, 5, 12, 12), full.sub(0, 12, 5, 12, 12, 12)
    o1, l1 = forward(q, k[:, :5], v[:, :5], mask=m1, backend=backend)
    o2, l2 = forward(q, k[:, 5:], v[:, 5:], mask=m2, backend=backend)
    mo, ml = merge(o1, l1, o2, l2)
    assert _err(mo, out) <= 1e-5 and _err(ml, lse) <= 1e-5
    g1 = backward(do, q, k[:, :5], v[:, :5], mo.float(), ml, mask=m1, backend=backend)
    g2 = backward(do, q, k[:, 5:], v[:, 5:], mo.float(), ml, mask=m2, backend=backend)
    assert _err(g1[0] + g2[0], ref[0]) <= 1e-5
    assert _err(torch.cat([g1[1], g2[1]], 1), ref[1]) <= 1e-5
    assert _err(torch.cat([g1[2], g2[2]], 1), ref[2]) <= 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq,sk", [(0, 5), (5, 0), (0, 0)])
def test_empty_blocks(backend, sq, sk):
    d = HEAD_DIMS.get(backend, [16])[0]
    q, k, v, do = _tensors(2, sq, sk, 2, 2, d, torch.float32)
    out, lse = forward(q, k, v, mask=Mask.causal(), backend=backend)
    assert out.shape == q.shape and lse.shape == (2, 4, sq) and torch.isneginf(lse).all()
    dq, dk, dv = backward(do, q, k, v, out, lse, mask=Mask.causal(), backend=backend)
    assert dq.shape == q.shape and dk.shape == k.shape and not dk.any() and not dq.any()

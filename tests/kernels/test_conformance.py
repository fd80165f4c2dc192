"""Every kernel backend, `reference` included, against the independent float64 oracle (tests/support/oracle.py).

The masks are drawn from everything the planner can send a kernel: causal with any diagonal offset, the
striped shifted diagonal, windows with offsets, left-only and right-only bands, empty and full bands, document
masks on top of any band, with logit soft-capping for the backends that compute it. Each case also checks that
the named backend itself ran (no silent fallback to reference) and that `Mask.dense` and the pair counts agree
with the oracle's element-wise mask.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from longctx import kernels
from longctx.kernels import Mask, backends, backward, forward, merge
from tests.support import oracle
from tests.support.backends import CUDA, HAS_TRITON, check_ran, expected_fallbacks, report

# On a GPU machine (make gpu-check) the backends run on CUDA tensors; the oracle always runs on the CPU.
DEV = "cuda" if CUDA else "cpu"

# Every backend this machine can run; triton runs under its interpreter with the opt-in of `triton_env`.
BACKENDS = ["reference", "sdpa"] + (["triton"] if HAS_TRITON else []) + \
    [name for name in ("flash", "cudnn") if name in backends() and kernels.backend_status()[name] is None]
# The Triton interpreter is slow on CPU: fewer, smaller examples, same assertions.
EXAMPLES = {"triton": 30}
HEAD_DIMS = {"triton": [16, 32]}


@pytest.fixture
def backend_env(request, triton_env):
    """The opt-in environment for the backend under test only (see tests/support/backends.py)."""
    if request.param == "triton":
        triton_env()
    assert kernels.backend_status()[request.param] is None, kernels.backend_status()[request.param]
    return request.param


@st.composite
def bands(draw, sq, sk):
    """(left, right, offset) of any band the planner emits, or a random one."""
    off = draw(st.one_of(st.none(), st.integers(-sq - 2, sk + 2)))
    kind = draw(st.sampled_from(["none", "causal", "shifted", "window", "window_both", "left_only", "right_only",
                                 "crossed", "random"]))
    w = draw(st.integers(1, max(sq, sk) + 2))
    if kind == "none":
        return None, None, off
    if kind == "causal":
        return None, 0, off
    if kind == "shifted":
        return None, -1, off
    if kind == "window":
        return w - 1, 0, off
    if kind == "window_both":
        return w - 1, w - 1, off
    if kind == "left_only":
        return draw(st.integers(0, sk + 1)), None, off
    if kind == "right_only":
        return None, draw(st.integers(-sq - 1, sk + 1)), off
    if kind == "crossed":  # left + right < -1: edges crossed, no pair at all (and hi < lo in closed forms)
        right = draw(st.integers(-sk - 2, sk + 2))
        return draw(st.integers(-right - sk - 4, -right - 2)), right, off
    # any two edges
    return draw(st.integers(-sk - 2, sk + 2)), draw(st.integers(-sk - 2, sk + 2)), off


@st.composite
def masks(draw, b, sq, sk):
    left, right, off = draw(bands(sq, sk))
    if not draw(st.booleans()) or draw(st.integers(0, 2)) > 0:
        return Mask(left=left, right=right, offset=off)
    ndoc = draw(st.integers(1, 3))
    rows = draw(st.sampled_from([1, b]))  # (1, S) document ids broadcast over the batch
    qd = torch.randint(0, ndoc, (rows, sq)).sort(-1).values
    kd = torch.randint(0, ndoc, (rows, sk)).sort(-1).values
    return Mask(left=left, right=right, offset=off, q_doc=qd, k_doc=kd)


@st.composite
def cases(draw, backend):
    b = draw(st.integers(1, 2))
    sq = draw(st.integers(1, 20))
    sk = draw(st.integers(1, 20))
    hkv = draw(st.integers(1, 2))
    g = draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from(HEAD_DIMS.get(backend, [8, 16])))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16] + ([torch.float64] if backend == "reference"
                                                                      else [])))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    mask = draw(masks(b, sq, sk))
    dv = draw(st.sampled_from(HEAD_DIMS.get(backend, [8, 16])))  # v's width: half the cases differ from q/k's
    # soft-capping (Gemma 2) where the backend computes it: caps around the scores' own scale, so they bend them
    capped = backends()[backend].softcap and draw(st.booleans())
    softcap = draw(st.sampled_from([0.5, 1.0, 3.0])) if capped else None
    return b, sq, sk, hkv, g, d, dv, mask, dtype, softcap


def _tensors(b, sq, sk, hkv, g, d, dtype, dv=None):
    """q, k of width d; v and dout of width dv (multi-head latent attention when they differ)."""
    dv = d if dv is None else dv
    q = torch.randn(b, sq, hkv * g, d).to(dtype)
    k = torch.randn(b, sk, hkv, d).to(dtype)
    v = torch.randn(b, sk, hkv, dv).to(dtype)
    do = torch.randn(b, sq, hkv * g, dv).to(dtype)
    return q, k, v, do


def _on_dev(mask, *tensors):
    """The tensors and the mask's document ids on the device under test."""
    if mask.q_doc is not None and DEV != "cpu":
        mask = Mask(mask.left, mask.right, mask.offset, mask.q_doc.to(DEV), mask.k_doc.to(DEV))
    return (mask, *(t.to(DEV) for t in tensors))


def _err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    same_inf = torch.isinf(a) & torch.isinf(b) & (a.sign() == b.sign())
    diff = torch.where(same_inf, torch.zeros_like(a), (a - b).abs())
    return diff.max().item() if diff.numel() else 0.0


def _run(backend, q, k, v, do, mask, softcap=None):
    out, lse = forward(q, k, v, mask=mask, backend=backend, softcap=softcap)
    grads = backward(do, q, k, v, out, lse, mask=mask, backend=backend, softcap=softcap)
    return out, lse, grads


def _check(backend, case):
    b, sq, sk, hkv, g, d, dv, mask, dtype, softcap = case
    q, k, v, do = _tensors(b, sq, sk, hkv, g, d, dtype, dv)
    kernels.reset_calls()
    dmask, *dev = _on_dev(mask, q, k, v, do)
    out, lse, grads = _run(backend, *dev, dmask, softcap)
    out, lse, grads = out.cpu(), lse.cpu(), tuple(x.cpu() for x in grads)
    # a backend of one width gets the narrower side zero-padded: the fused op sees the wider
    check_ran(report(), backend, DEV, fallbacks=expected_fallbacks(backend, DEV, dtype, mask, max(d, dv), 2),
              label=mask)
    assert out.dtype == dtype and lse.shape == (b, hkv * g, sq) and out.shape == (b, sq, hkv * g, dv)
    assert tuple(grads[0].shape) == (b, sq, hkv * g, d) and tuple(grads[2].shape) == (b, sk, hkv, dv)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert all(x.dtype == dtype for x in grads)
    assert not out.isnan().any() and not lse.isnan().any() and not any(x.isnan().any() for x in grads)
    x_out, x_lse, x_grads = oracle.attention(q, k, v, do=do, softcap=softcap, **oracle.band(mask))
    # rows with no allowed key: exactly out = 0, lse = -inf and dq = 0
    empty = torch.isneginf(x_lse)
    assert torch.equal(torch.isneginf(lse), empty), mask
    assert (out.transpose(1, 2)[empty] == 0).all() and (grads[0].transpose(1, 2)[empty] == 0).all()
    errs = [_err(out, x_out), _err(lse, x_lse)] + [_err(a, x) for a, x in zip(grads, x_grads)]
    if dtype == torch.float64:
        assert max(errs) <= 1e-10, (mask, errs)
    elif dtype == torch.float32:
        assert max(errs) <= 1e-5, (mask, errs)
    else:
        # bf16: the inputs are exact bf16 values, so the oracle is exact for them; allow what rounding the
        # output and FlashAttention-style P/dS to bf16 loses: 2^-6 of the largest exact value (a few bf16
        # ulps). A wrong mask, offset, scale or head map is off by O(1) and still fails.
        scale = [x_out.abs().max().item(), 1.0] + [t.abs().max().item() for t in x_grads]
        for e, s in zip(errs, scale):
            assert e <= 2**-6 * max(s, 1e-3) + 1e-6, (mask, errs, scale)


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
def test_every_backend_matches_the_oracle(backend_env):
    backend = backend_env

    @settings(max_examples=EXAMPLES.get(backend, 80), deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(cases(backend))
    def inner(case):
        _check(backend, case)

    inner()


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
@pytest.mark.parametrize("kind", ["none", "causal", "window"])
def test_backward_with_global_out_lse(backend_env, kind):
    """Block backward with the merged (global) out/lse sums to the full gradient: what ring needs."""
    backend = backend_env
    torch.manual_seed(0)
    d = HEAD_DIMS.get(backend, [16])[-1]
    q, k, v, do = _tensors(2, 12, 12, 2, 2, d, torch.float32)
    full = {"none": Mask.none(), "causal": Mask.causal(), "window": Mask.sliding_window(4, causal=False)}[kind]
    x_out, x_lse, x_grads = oracle.attention(q, k, v, do=do, **oracle.band(full))
    full, q, k, v, do = _on_dev(full, q, k, v, do)
    kernels.reset_calls()
    # two key blocks [0, 5) and [5, 12) with the same global rule re-expressed on each block
    m1, m2 = full.sub(0, 12, 0, 5, 12, 12), full.sub(0, 12, 5, 12, 12, 12)
    o1, l1 = forward(q, k[:, :5], v[:, :5], mask=m1, backend=backend)
    o2, l2 = forward(q, k[:, 5:], v[:, 5:], mask=m2, backend=backend)
    mo, ml = merge(o1, l1, o2, l2)
    assert _err(mo, x_out) <= 1e-5 and _err(ml, x_lse) <= 1e-5
    g1 = backward(do, q, k[:, :5], v[:, :5], mo.float(), ml, mask=m1, backend=backend)
    g2 = backward(do, q, k[:, 5:], v[:, 5:], mo.float(), ml, mask=m2, backend=backend)
    check_ran(report(), backend, DEV, fallbacks=expected_fallbacks(backend, DEV, torch.float32, full, d, 4))
    assert _err(g1[0] + g2[0], x_grads[0]) <= 1e-5
    assert _err(torch.cat([g1[1], g2[1]], 1), x_grads[1]) <= 1e-5
    assert _err(torch.cat([g1[2], g2[2]], 1), x_grads[2]) <= 1e-5


@pytest.mark.parametrize("backend_env", BACKENDS, indirect=True)
@pytest.mark.parametrize("sq,sk", [(0, 5), (5, 0), (0, 0)])
def test_empty_blocks(backend_env, sq, sk):
    d, width = HEAD_DIMS.get(backend_env, [16])[0], 2 * HEAD_DIMS.get(backend_env, [16])[0]
    q, k, v, do = (t.to(DEV) for t in _tensors(2, sq, sk, 2, 2, d, torch.float32, width))
    out, lse = forward(q, k, v, mask=Mask.causal(), backend=backend_env)
    assert out.shape == (2, sq, 4, width) and lse.shape == (2, 4, sq) and torch.isneginf(lse).all()
    dq, dk, dv = backward(do, q, k, v, out, lse, mask=Mask.causal(), backend=backend_env)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape and not dk.any() and not dq.any()


# ------------------------------------------------------------------------------------ Mask against the oracle
@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.data())
def test_mask_dense_and_pair_counts_match_the_elementwise_definition(data):
    b = data.draw(st.integers(1, 2))
    sq, sk = data.draw(st.integers(0, 12)), data.draw(st.integers(0, 12))
    mask = data.draw(masks(b, sq, sk))
    want = oracle.allowed(sq, sk, b, **oracle.band(mask))
    got = mask.dense(sq, sk).expand(b, sq, sk)
    assert torch.equal(got, want), mask
    assert mask.count_pairs(sq, sk, b) == int(want.sum())
    band_only = oracle.allowed(sq, sk, 1, left=mask.left, right=mask.right, offset=mask.offset)[0]
    assert mask.band_pairs(sq, sk) == int(band_only.sum())
    assert mask.is_empty(sq, sk) == (not band_only.any())
    assert mask.is_full(sq, sk) == (not mask.has_documents and bool(band_only.all()))
    for i in range(sq):
        lo, hi = mask.key_range(i, sq, sk)
        cols = band_only[i].nonzero().flatten().tolist()
        assert (cols == list(range(lo, hi))) if cols else lo >= hi, (mask, i)
    if sq and sk:  # a sub-block re-expresses the same global rule
        q0, q1 = sorted(data.draw(st.tuples(st.integers(0, sq), st.integers(0, sq))))
        k0, k1 = sorted(data.draw(st.tuples(st.integers(0, sk), st.integers(0, sk))))
        sub = mask.sub(q0, q1, k0, k1, sq, sk)
        assert torch.equal(sub.dense(q1 - q0, k1 - k0).expand(b, q1 - q0, k1 - k0), want[:, q0:q1, k0:k1])

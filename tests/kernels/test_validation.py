"""Bad input to the kernel contract gets an error that names the argument and the fix."""

import re

import pytest
import torch

from longctx.kernels import Backend, Mask, attention, backward, forward, register, resolve, unregister


def _qkv(b=1, s=4, h=4, hkv=2, d=8, dtype=torch.float32):
    return torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hkv, d, dtype=dtype), \
        torch.randn(b, s, hkv, d, dtype=dtype)


def test_wrong_rank():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"q must be 4-D .*transpose"):
        forward(q[0], k, v)
    with pytest.raises(ValueError, match="k must be 4-D"):
        forward(q, k[..., 0], v)


def test_not_a_tensor():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        forward(q, k, v.numpy())


@pytest.mark.parametrize("which,shape,match", [
    ("k", (2, 4, 2, 8), "batch mismatch"),
    ("v", (1, 5, 2, 8), "seq mismatch"),
    ("k", (1, 4, 2, 16), "head_dim mismatch: q has 8 but k has 16; q and k must be equally wide"),
    ("v", (1, 4, 2, 0), "v has head_dim 0"),
    ("v", (1, 4, 1, 8), "same kv heads"),
])
def test_mismatched_shapes(which, shape, match):
    q, k, v = _qkv()
    t = {"k": k, "v": v}
    t[which] = torch.randn(*shape)
    with pytest.raises(ValueError, match=match):
        forward(q, t["k"], t["v"])


def test_out_and_dout_take_the_width_of_v():
    q, k, _ = _qkv()
    v = torch.randn(1, 4, 2, 4)  # narrower than q/k (multi-head latent attention)
    out, lse = forward(q, k, v, backend="reference")
    assert out.shape == (1, 4, 4, 4)
    with pytest.raises(ValueError, match=re.escape("dout (1, 4, 4, 8) and out (1, 4, 4, 4) must be (batch, seq_q, "
                                                   "heads, v's head_dim) = (1, 4, 4, 4)")):
        backward(torch.zeros(q.shape), q, k, v, out, lse)


def test_heads_not_divisible():
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="heads not divisible.*multiple of the kv heads"):
        forward(q, k, k)


def test_mixed_dtypes():
    q, k, v = _qkv()
    with pytest.raises(TypeError, match=r"k has dtype torch.bfloat16 .*k.to\(q.dtype\)"):
        forward(q, k.bfloat16(), v)
    with pytest.raises(TypeError, match="q has dtype torch.int64"):
        forward(q.long(), k.long(), v.long())


def test_mixed_devices():
    q, k, v = _qkv()
    meta = torch.empty(k.shape, device="meta")
    with pytest.raises(ValueError, match=r"k is on meta but q is on cpu.*to\(q.device\)"):
        forward(q, meta, v)


def test_unknown_backend_and_mask():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'.*reference"):
        forward(q, k, v, backend="nope")
    with pytest.raises(ValueError, match="unknown mask 'diagonal'"):
        forward(q, k, v, mask="diagonal")
    with pytest.raises(TypeError, match="mask must be a longctx.kernels.Mask"):
        forward(q, k, v, mask=3)


def test_bad_scale():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="scale must be a positive finite float"):
        forward(q, k, v, scale=-1.0)


def test_document_ids_shape():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="q_doc has shape"):
        forward(q, k, v, mask=Mask.documents(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 4, dtype=torch.long)))


def test_backward_shapes():
    q, k, v = _qkv()
    out, lse = forward(q, k, v)
    with pytest.raises(ValueError, match="lse must have shape"):
        backward(out, q, k, v, out, lse[:, :, :2])
    with pytest.raises(ValueError, match="dout"):
        backward(out[:, :2], q, k, v, out, lse)


def test_named_backend_that_cannot_run_says_why():
    q, k, v = _qkv()
    b = Backend("picky-test", forward=None, backward=None, priority=-1,
                supports=lambda q, k, v, mask: "only on Tuesdays")
    register(b, replace=True)
    try:
        with pytest.raises(ValueError, match="picky-test.*only on Tuesdays"):
            resolve("picky-test", q, k, v, Mask.none())
        with pytest.raises(ValueError, match="already registered"):
            register(b)
    finally:
        unregister("picky-test")


def test_auto_prefers_sdpa_on_cpu_and_string_masks_work():
    q, k, v = _qkv()
    assert resolve("auto", q, k, v, Mask.none()).name == "sdpa"
    a = forward(q, k, v, mask="causal")[0]
    b = forward(q, k, v, mask=Mask.causal(), backend="reference")[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_attention_autograd_matches_reference_autograd():
    q, k, v = (t.double().requires_grad_() for t in _qkv())
    out = attention(q, k, v, mask=Mask.causal())
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    # plain autograd through the math
    kk = k.repeat_interleave(2, dim=2)
    vv = v.repeat_interleave(2, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", q, kk) / 8 ** 0.5
    s = s.masked_fill(~torch.ones(4, 4, dtype=torch.bool).tril(), float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", s.softmax(-1), vv)
    ref.square().sum().backward()
    for g, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, t.grad, atol=1e-10, rtol=0)

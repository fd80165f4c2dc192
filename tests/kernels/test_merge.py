import pytest
import torch

from longctx.kernels import Mask, empty_state, forward, merge, merge_, merge_many

INF = float("inf")


def _attn(q, k, v, mask=None):
    return forward(q, k, v, mask=mask, backend="reference")


def _rand(b=2, s=6, h=3, d=4, sk=None, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, s, h, d, generator=g, dtype=dtype)
    k = torch.randn(b, sk or s, h, d, generator=g, dtype=dtype)
    v = torch.randn(b, sk or s, h, d, generator=g, dtype=dtype)
    return q, k, v


def test_merge_two_blocks_equals_full():
    q, k, v = _rand(sk=10)
    o, l = _attn(q, k, v)
    oa, la = _attn(q, k[:, :4], v[:, :4])
    ob, lb = _attn(q, k[:, 4:], v[:, 4:])
    mo, ml = merge(oa, la, ob, lb)
    torch.testing.assert_close(mo, o, atol=1e-12, rtol=0)
    torch.testing.assert_close(ml, l, atol=1e-12, rtol=0)


def test_merge_many_order_independent():
    q, k, v = _rand(sk=12)
    parts = [_attn(q, k[:, i:i + 3], v[:, i:i + 3]) for i in range(0, 12, 3)]
    o, l = _attn(q, k, v)
    mo, ml = merge_many([p[0] for p in parts], [p[1] for p in parts])
    mo2, ml2 = merge_many([p[0] for p in parts[::-1]], [p[1] for p in parts[::-1]])
    torch.testing.assert_close(mo, o, atol=1e-12, rtol=0)
    torch.testing.assert_close(mo2, o, atol=1e-12, rtol=0)
    torch.testing.assert_close(ml2, l, atol=1e-12, rtol=0)


def test_merge_with_empty_block_is_identity():
    q, k, v = _rand()
    o, l = _attn(q, k, v)
    eo, el = empty_state(*o.shape[:3], o.shape[3], dtype=torch.float64)
    mo, ml = merge(eo, el, o, l)
    torch.testing.assert_close(mo, o, atol=0, rtol=0)
    torch.testing.assert_close(ml, l, atol=0, rtol=0)
    mo, ml = merge(o, l, eo, el)
    torch.testing.assert_close(mo, o, atol=0, rtol=0)


def test_fully_masked_rows_stay_zero_and_neg_inf_without_nan():
    q, k, v = _rand(s=5)
    # offset -3: rows 0..2 see nothing in this block
    oa, la = _attn(q, k, v, Mask.causal(offset=-3))
    assert torch.isneginf(la[:, :, :3]).all() and (oa[:, :3] == 0).all()
    eo, el = empty_state(2, 5, 3, 4, dtype=torch.float64)
    mo, ml = merge(eo, el, oa, la)  # both partials empty on rows 0..2
    assert not mo.isnan().any() and not ml.isnan().any()
    assert torch.isneginf(ml[:, :, :3]).all() and (mo[:, :3] == 0).all()


def test_plus_inf_lse_from_flash_convention_does_not_wipe_row():
    q, k, v = _rand()
    o, l = _attn(q, k, v)
    junk = torch.full_like(o, 7.0)
    plus_inf = torch.full_like(l, INF)  # flash-attn's empty-row lse
    mo, ml = merge(o, l, junk, plus_inf)
    torch.testing.assert_close(mo, o, atol=0, rtol=0)
    torch.testing.assert_close(ml, l, atol=0, rtol=0)


def test_large_lse_no_overflow():
    o = torch.randn(1, 3, 1, 2, dtype=torch.float32)
    l1 = torch.full((1, 1, 3), 1e4)
    l2 = torch.full((1, 1, 3), 1e4 - 1.0)
    mo, ml = merge(o, l1, o * 2, l2)
    assert torch.isfinite(mo).all() and torch.isfinite(ml).all()
    w = 1 / (1 + torch.exp(torch.tensor(-1.0)))
    torch.testing.assert_close(mo, o * w + 2 * o * (1 - w))


def test_merge_inplace_rows():
    q, k, v = _rand(s=6, sk=8)
    o, l = _attn(q, k, v)
    acc_o, acc_l = empty_state(2, 6, 3, 4, dtype=torch.float64)
    oa, la = _attn(q, k[:, :5], v[:, :5])
    ob, lb = _attn(q[:, 2:], k[:, 5:], v[:, 5:])  # only rows 2: get the second block
    merge_(acc_o, acc_l, oa, la)
    merge_(acc_o, acc_l, ob, lb, rows=slice(2, None))
    torch.testing.assert_close(acc_o[:, 2:], o[:, 2:], atol=1e-12, rtol=0)
    torch.testing.assert_close(acc_o[:, :2], oa[:, :2], atol=1e-12, rtol=0)


def test_merge_is_differentiable_including_empty_rows():
    torch.manual_seed(0)
    o1 = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    o2 = torch.randn(1, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    l1 = torch.randn(1, 2, 4, dtype=torch.float64)
    l2 = torch.randn(1, 2, 4, dtype=torch.float64)
    l1[..., 0] = -INF
    l2[..., 0] = -INF  # an empty row in both
    l2[..., 1] = -INF  # a row only the first partial has
    l1.requires_grad_(True)
    l2.requires_grad_(True)

    def f(a, b, c, d):
        o, lse = merge(a, c, b, d)
        return o, torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))

    out, lse = f(o1, o2, l1, l2)
    (out.sum() + lse.sum()).backward()
    for t in (o1, o2, l1, l2):
        assert not t.grad.isnan().any()
    # finite rows: gradcheck against finite differences
    sel = slice(2, 4)
    a, b = o1.detach()[:, sel].clone().requires_grad_(), o2.detach()[:, sel].clone().requires_grad_()
    c, d = l1.detach()[..., sel].clone().requires_grad_(), l2.detach()[..., sel].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c, d: merge(a, c, b, d), (a, b, c, d))


def test_merge_many_needs_input():
    with pytest.raises(ValueError, match="at least one"):
        merge_many([], [])

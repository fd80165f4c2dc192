"""The oracle: attention in plain PyTorch math with fp32 (or fp64) accumulation.

GQA runs by viewing the query heads as (kv_heads, group): K and V are never repeated. Work is chunked
over query rows so the score matrix of a long block never has to exist at once. With `softcap` the
scores are capped (c tanh(s / c)) before the mask, and the backward multiplies dS by the cap's derivative.
"""

from __future__ import annotations

import torch

from .mask import Mask
from .merge import acc_dtype
from .softcap import soft_cap

_INF = float("inf")
_CHUNK_ELEMS = 1 << 24  # score elements per chunk (64 MiB in fp32)


def _chunks(b: int, sq: int, sk: int, h: int):
    step = max(1, _CHUNK_ELEMS // max(1, b * sk * h))
    for q0 in range(0, sq, step):
        yield q0, min(sq, q0 + step)


def _scores(qc, k, scale, mask: Mask, q0, q1, sq, sk, softcap=None):
    """(masked scores, d capped / d uncapped score or None); qc: (B, c, Hkv, G, D) in acc dtype, k: (B, Sk, Hkv, D)."""
    s = torch.einsum("bqhgd,bkhd->bhgqk", qc, k) * scale
    slope = None
    if softcap is not None:
        s, slope = soft_cap(s, softcap)
    allowed = mask.sub(q0, q1, 0, sk, sq, sk).dense(q1 - q0, sk, device=s.device)  # (B|1, c, Sk)
    return s.masked_fill(~allowed[:, None, None], -_INF), slope


def forward(q, k, v, *, scale: float, mask: Mask, out_dtype=None, softcap=None):
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    acc = acc_dtype(q.dtype)
    kf, vf = k.to(acc), v.to(acc)
    qf = q.to(acc).view(b, sq, hkv, g, d)
    out = torch.empty(b, sq, hkv, g, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.empty(b, hkv, g, sq, dtype=acc, device=q.device)
    for q0, q1 in _chunks(b, sq, sk, h):
        s, _ = _scores(qf[:, q0:q1], kf, scale, mask, q0, q1, sq, sk, softcap)
        l_c = torch.logsumexp(s, dim=-1)
        l_safe = torch.where(torch.isfinite(l_c), l_c, torch.zeros_like(l_c))
        p = torch.exp(s - l_safe[..., None])  # masked entries: exp(-inf) = 0, empty rows stay all 0
        out[:, q0:q1] = torch.einsum("bhgqk,bkhd->bqhgd", p, vf)
        lse[..., q0:q1] = l_c
    return out.view(b, sq, h, -1).to(out_dtype or q.dtype), lse.reshape(b, h, sq)


def backward(dout, q, k, v, out, lse, *, scale: float, mask: Mask, grad_dtype=None, softcap=None):
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    g = h // hkv
    acc = acc_dtype(q.dtype)
    qf = q.to(acc).view(b, sq, hkv, g, d)
    kf, vf = k.to(acc), v.to(acc)
    do = dout.to(acc).view(b, sq, hkv, g, -1)
    # D = rowsum(dO * O) with the (possibly global) output: this is what makes block backward exact.
    delta = (do * out.to(acc).view(b, sq, hkv, g, -1)).sum(-1).permute(0, 2, 3, 1)  # (B, Hkv, G, Sq)
    lse = lse.to(acc).view(b, hkv, g, sq)
    # Rows with lse = -inf saw no key anywhere: their probabilities are 0, not exp(-inf + inf).
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, _INF), lse)
    dq = torch.empty_like(qf)
    dk = torch.zeros_like(kf)
    dv = torch.zeros_like(vf)
    for q0, q1 in _chunks(b, sq, sk, h):
        s, slope = _scores(qf[:, q0:q1], kf, scale, mask, q0, q1, sq, sk, softcap)
        p = torch.exp(s - lse[..., q0:q1, None])
        dp = torch.einsum("bqhgd,bkhd->bhgqk", do[:, q0:q1], vf)
        ds = p * (dp - delta[..., q0:q1, None])
        if slope is not None:  # masked entries have p = 0, so their slope (finite) changes nothing
            ds = ds * slope
        dq[:, q0:q1] = torch.einsum("bhgqk,bkhd->bqhgd", ds, kf) * scale
        dk += torch.einsum("bhgqk,bqhgd->bkhd", ds, qf[:, q0:q1]) * scale
        dv += torch.einsum("bhgqk,bqhgd->bkhd", p, do[:, q0:q1])
    return (
        dq.view(b, sq, h, d).to(grad_dtype or q.dtype),
        dk.to(grad_dtype or k.dtype),
        dv.to(grad_dtype or v.dtype),
    )

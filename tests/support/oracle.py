"""An independent float64 oracle for attention: explicit scores, a mask built pair by pair from its
definition, K/V heads repeated for GQA, autograd for the gradients.

It imports nothing from longctx on purpose. Every exactness claim of the project (kernels, schedules,
tree decoding, the model) is checked against this file, so a wrong mask, scale or head mapping in the
product cannot hide by being shared with its own oracle. It is slow and simple by design: small shapes
only.

The mask rule (docs/algorithms.md §1.2), for query row i and key column j of an (sq, sk) block:
    diag = sk - sq if offset is None else offset       (bottom-right alignment by default)
    d = j - (i + diag)
    allowed iff (left is None or d >= -left) and (right is None or d <= right)
                and (no documents or q_doc[b][i] == k_doc[b][j])
"""

from __future__ import annotations

import functools
import math

import torch

BAND_FIELDS = ("left", "right", "offset", "q_doc", "k_doc")


def band(mask) -> dict:
    """The defining fields of a mask object (read as data, no method of it is called)."""
    if mask is None:
        return {}
    return {name: getattr(mask, name) for name in BAND_FIELDS}


def flags(causal: bool, window: int | None = None) -> dict:
    """What a whole-sequence call with (causal, window) means: a window of `window` keys ending at the
    query's own position (causal) or reaching window-1 either side of it (not causal)."""
    if window is not None:
        return {"left": window - 1, "right": 0 if causal else window - 1}
    return {"right": 0} if causal else {}


@functools.lru_cache(maxsize=512)
def _band_allowed(sq: int, sk: int, left, right, offset) -> torch.Tensor:
    diag = sk - sq if offset is None else offset
    rows = []
    for i in range(sq):
        row = []
        for j in range(sk):
            d = j - (i + diag)
            row.append((left is None or d >= -left) and (right is None or d <= right))
        rows.append(row)
    return torch.tensor(rows, dtype=torch.bool).reshape(sq, sk)


def allowed(sq: int, sk: int, batch: int = 1, *, left=None, right=None, offset=None, q_doc=None,
            k_doc=None) -> torch.Tensor:
    """(batch, sq, sk) boolean matrix of the pairs the mask allows, element by element."""
    ok = _band_allowed(sq, sk, left, right, offset).expand(batch, sq, sk).clone()
    if q_doc is not None:
        qd, kd = q_doc.tolist(), k_doc.tolist()
        for b in range(batch):
            qb, kb = qd[b if len(qd) > 1 else 0], kd[b if len(kd) > 1 else 0]
            for i in range(sq):
                for j in range(sk):
                    if qb[i] != kb[j]:
                        ok[b, i, j] = False
    return ok


def pairs(sq: int, sk: int, batch: int = 1, **mask) -> int:
    """Allowed (query, key) pairs summed over the batch."""
    return int(allowed(sq, sk, batch, **mask).sum())


def _forward(q, k, v, scale, ok, sinks=None, softcap=None):
    b, sq, h, d = q.shape
    group = h // k.shape[2]
    qh = q.transpose(1, 2)                                   # (B, H, Sq, D)
    kh = k.repeat_interleave(group, dim=2).transpose(1, 2)   # query head j reads kv head j // group
    vh = v.repeat_interleave(group, dim=2).transpose(1, 2)
    scores = torch.matmul(qh, kh.transpose(-1, -2)) * scale  # (B, H, Sq, Sk)
    if softcap is not None:  # Gemma 2: scores bent into (-softcap, softcap), autograd differentiates the tanh
        scores = softcap * torch.tanh(scores / softcap)
    keep = ok[:, None].expand_as(scores)
    scores = scores.masked_fill(~keep, -math.inf)
    # explicit normalisation: the shift is a detached constant (softmax does not depend on it), so
    # autograd never differentiates a logsumexp of an all -inf row (that would be NaN)
    shift = scores.detach().amax(dim=-1, keepdim=True)
    if sinks is not None:  # one more key per head, logit sinks[h], value zero: only the normaliser grows
        shift = torch.maximum(shift, sinks.detach()[None, :, None, None])
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    e = torch.exp(scores - shift) * keep
    denom = e.sum(dim=-1, keepdim=True)
    if sinks is not None:
        denom = denom + torch.exp(sinks[None, :, None, None] - shift)
    p = e / torch.where(denom > 0, denom, torch.ones_like(denom))  # a row with no key: all zero
    lse = torch.where(denom > 0, denom.log() + shift, torch.full_like(denom, -math.inf)).squeeze(-1)
    out = torch.matmul(p, vh).transpose(1, 2)                # (B, Sq, H, D)
    return out, lse


def attention(q, k, v, *, scale=None, do=None, sinks=None, softcap=None, **mask):
    """out (B, Sq, H, D) and lse (B, H, Sq) in float64; with `do`, also (dq, dk, dv) by autograd, and with
    `sinks` (H,) (attention sinks: a zero-valued key of logit sinks[h] in every row) (dq, dk, dv, dsinks).
    `softcap`: every score s replaced by softcap * tanh(s / softcap) before the mask."""
    q, k, v = (t.detach().to(torch.float64).requires_grad_(do is not None) for t in (q, k, v))
    inputs = (q, k, v)
    if sinks is not None:
        sinks = sinks.detach().to(torch.float64).requires_grad_(do is not None)
        inputs = (q, k, v, sinks)
    b, sq, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    ok = allowed(sq, k.shape[1], b, **mask)
    with torch.enable_grad():
        out, lse = _forward(q, k, v, scale, ok, sinks, softcap)
        if do is None:
            return out.detach(), lse.detach()
        grads = torch.autograd.grad(out, inputs, do.to(torch.float64))
    return out.detach(), lse.detach(), grads

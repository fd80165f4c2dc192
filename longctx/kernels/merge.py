"""Exact merging of attention partials through their log-sum-exp (docs/algorithms.md §2).

Layouts follow the kernel contract: out (B, S, H, D), lse (B, H, S). State is fp32 (fp64 stays fp64).
Guards: an lse of +inf (flash-attn's empty-row convention) counts as -inf; rows where every partial is
empty stay out = 0, lse = -inf, and neither the values nor the gradients become NaN.
"""

from __future__ import annotations

import torch

_INF = float("inf")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation / LSE dtype for inputs of `dtype`: fp32, or fp64 for fp64 (the test oracle)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _clean(lse: torch.Tensor) -> torch.Tensor:
    return torch.where(lse == _INF, torch.full_like(lse, -_INF), lse)


def _weights(lses: torch.Tensor):
    """lses (n, B, H, S) -> per-partial weights (n, B, H, S) and the merged lse (B, H, S)."""
    lses = _clean(lses)
    m = lses.amax(0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(lses - m_safe)
    s = e.sum(0)
    nonempty = s > 0
    s_safe = torch.where(nonempty, s, torch.ones_like(s))
    lse = torch.where(nonempty, m_safe + torch.log(s_safe), torch.full_like(s, -_INF))
    return e / s_safe, lse


def merge_many(outs, lses):
    """Merge n partials at once: outs (n, B, S, H, D) or a list, lses (n, B, H, S) or a list."""
    if isinstance(outs, (list, tuple)):
        if len(outs) == 0:
            raise ValueError("merge_many needs at least one partial")
        outs = torch.stack(outs)
        lses = torch.stack(list(lses))
    dt = acc_dtype(outs.dtype)
    w, lse = _weights(lses.to(dt))
    out = (outs.to(dt) * w.transpose(2, 3).unsqueeze(-1)).sum(0)
    return out, lse


def merge(out_a, lse_a, out_b, lse_b):
    """Merge two partials (differentiable). Returns (out, lse) in fp32 (fp64 for fp64 inputs)."""
    return merge_many([out_a, out_b], [lse_a, lse_b])


@torch.no_grad()
def merge_(acc_out, acc_lse, out_b, lse_b, rows: slice | None = None):
    """In-place merge of a block into running fp32 state, optionally into a row range of the sequence.

    Used inside schedules' forward loops, where autograd is handled by the schedule's own backward.
    """
    if rows is None:
        rows = slice(None)
    o, lse = merge(acc_out[:, rows], acc_lse[:, :, rows], out_b, lse_b)
    acc_out[:, rows] = o
    acc_lse[:, :, rows] = lse
    return acc_out, acc_lse


def merge_sinks(out, lse, sinks):
    """(out, lse) with attention sinks merged in (gpt-oss, StreamingLLM): for each head one more key per
    query whose logit is sinks[h] (not scaled) and whose value is zero, so it only takes softmax weight from
    the real keys. out (B, S, H, D) keeps its dtype; lse (B, H, S) becomes the lse over keys and sink.
    Not differentiable: a schedule's backward runs on the merged (out, lse) and adds `sinks_grad`."""
    sink = sinks.detach().to(lse.dtype)[None, :, None]
    lse = _clean(lse)
    merged = torch.logaddexp(lse, sink.expand_as(lse))
    kept = torch.exp(lse - merged)  # the real keys' share of the softmax
    return (out.to(lse.dtype) * kept.transpose(1, 2).unsqueeze(-1)).to(out.dtype), merged


def sinks_grad(dout, out, lse, sinks):
    """The gradient of the sinks from merge_sinks' (out, lse): raising sinks[h] moves the sink's share
    p = exp(sinks[h] - lse) of every row from its output to zero, so d out / d sink = -p out and the
    gradient is -sum over rows of p <dout, out>. (The q, k, v gradients need nothing extra: the kernels'
    backward with the merged out and lse is exact, since lse is the softmax's normaliser.)"""
    acc = lse.dtype
    share = torch.exp(sinks.detach().to(acc)[None, :, None] - lse)
    delta = (dout.to(acc) * out.to(acc)).sum(-1).transpose(1, 2)  # (B, H, S)
    return -(share * delta).sum((0, 2)).to(sinks.dtype)


def empty_state(batch: int, seq: int, heads: int, dim: int, *, device=None, dtype=torch.float32):
    """The merge identity: out = 0, lse = -inf."""
    out = torch.zeros(batch, seq, heads, dim, device=device, dtype=dtype)
    lse = torch.full((batch, heads, seq), -_INF, device=device, dtype=dtype)
    return out, lse

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


def empty_state(batch: int, seq: int, heads: int, dim: int, *, device=None, dtype=torch.float32):
    """The merge identity: out = 0, lse = -inf."""
    out = torch.zeros(batch, seq, heads, dim, device=device, dtype=dtype)
    lse = torch.full((batch, heads, seq), -_INF, device=device, dtype=dtype)
    return out, lse

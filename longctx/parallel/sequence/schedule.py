"""What every sequence-parallel schedule shares: its spec, the kernel calls of one held K/V shard, and
the autograd Function that runs a (forward, backward) pair.

A schedule is a pair of functions `fwd(q, k, v, spec) -> (out, lse)` and `bwd(dout, q, k, v, out, lse,
spec) -> (dq, dk, dv)`. The ring family and all-gather differ only in how K/V shards arrive (ring hops or
one gather); the kernel calls a rank makes on a held shard come from the block planner (plan.py) in both.
Only q, k, v and the global out/lse are saved: the backward recomputes every block with the global
out/lse, which is what makes the distributed backward exact (docs/algorithms.md §2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import kernels
from ..comm import Comm
from .plan import Block


@dataclass(frozen=True, eq=False)
class ScheduleSpec:
    comm: Comm
    layout: str
    causal: bool
    window: int | None
    scale: float
    kernel: str


def blocks_forward(q, k, v, blocks: tuple[Block, ...], out, lse, spec: ScheduleSpec) -> int:
    """Run one held K/V shard's kernel calls and merge them into (out, lse); returns the pairs done."""
    pairs = 0
    for b in blocks:
        o, l = kernels.forward(q[:, b.q0:b.q1], k[:, b.k0:b.k1], v[:, b.k0:b.k1], scale=spec.scale,
                               mask=b.mask, backend=spec.kernel, out_dtype=out.dtype)
        kernels.merge_(out, lse, o, l, rows=slice(b.q0, b.q1))
        pairs += b.pairs
    return pairs * q.shape[0] * q.shape[2]


def blocks_backward(dout, q, k, v, out, lse, blocks, dq, dk, dv, spec: ScheduleSpec) -> int:
    """Block gradients with the global out/lse: dq += locally, dk/dv += into the travelling accumulator.
    Returns the pairs done."""
    for b in blocks:
        rows = slice(b.q0, b.q1)
        gq, gk, gv = kernels.backward(dout[:, rows], q[:, rows], k[:, b.k0:b.k1], v[:, b.k0:b.k1], out[:, rows],
                                      lse[:, :, rows], scale=spec.scale, mask=b.mask, backend=spec.kernel,
                                      grad_dtype=dq.dtype)
        dq[:, rows] += gq
        dk[:, b.k0:b.k1] += gk
        dv[:, b.k0:b.k1] += gv
    return sum(b.pairs for b in blocks) * q.shape[0] * q.shape[2]


class ScheduleFunction(torch.autograd.Function):
    """Autograd for any schedule given as (forward(q, k, v, spec) -> (out, lse),
    backward(dout, q, k, v, out, lse, spec) -> (dq, dk, dv)): saves only q, k, v and the global out/lse."""

    @staticmethod
    def forward(ctx, q, k, v, spec, fwd, bwd):
        out, lse = fwd(q, k, v, spec)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.spec, ctx.bwd = spec, bwd
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ctx.bwd(dout.contiguous(), q, k, v, out, lse, ctx.spec)
        return dq, dk, dv, None, None, None



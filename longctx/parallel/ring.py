"""Ring-family attention: ring (contiguous), zigzag and striped share this one loop.

They differ only in the token layout, and through it in the per-step block table (plan.py). Forward:
K and V travel together in one buffer, the transfer for step s+1 is posted before step s computes, and
partials merge into fp32 (out, lse) state. Backward (algorithms.md 1.3, 2.3): only q, k, v and the
global out/lse are saved; every step recomputes its blocks with the global out/lse, dQ accumulates in
fp32 locally, and fp32 dK/dV accumulators ride a second ring with the K/V block they belong to, arriving
home after W hops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..kernels import acc_dtype
from .comm import Comm
from .plan import Block, ring_src, step_blocks


@dataclass(frozen=True, eq=False)
class RingSpec:
    comm: Comm
    layout: str
    causal: bool
    window: int | None
    scale: float
    kernel: str


def blocks_forward(q, k, v, blocks: tuple[Block, ...], out, lse, spec: RingSpec) -> int:
    """Run one held K/V shard's kernel calls and merge them into (out, lse); returns the pairs done."""
    pairs = 0
    for b in blocks:
        o, l = kernels.forward(q[:, b.q0:b.q1], k[:, b.k0:b.k1], v[:, b.k0:b.k1], scale=spec.scale,
                               mask=b.mask, backend=spec.kernel, out_dtype=out.dtype)
        kernels.merge_(out, lse, o, l, rows=slice(b.q0, b.q1))
        pairs += b.pairs
    return pairs * q.shape[0] * q.shape[2]


def blocks_backward(dout, q, k, v, out, lse, blocks, dq, dk, dv, spec: RingSpec) -> int:
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


def _blocks(spec: RingSpec, n: int, src: int):
    c = spec.comm
    return step_blocks(spec.layout, n, c.world, c.rank, src, spec.causal, spec.window)


def ring_forward(q, k, v, spec: RingSpec):
    comm = spec.comm
    b, c, h, d = q.shape
    n = c * comm.world
    out, lse = kernels.empty_state(b, c, h, v.shape[-1], device=q.device, dtype=acc_dtype(q.dtype))
    kv = torch.stack([k, v])
    for s in range(comm.world):
        pending = comm.ring_exchange(kv, phase="fwd") if s < comm.world - 1 else None
        blocks = _blocks(spec, n, ring_src(comm.rank, s, comm.world))
        comm.stats.record_work("fwd", s, blocks_forward(q, kv[0], kv[1], blocks, out, lse, spec))
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, spec: RingSpec):
    comm = spec.comm
    c = q.shape[1]
    n = c * comm.world
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = torch.stack([k, v])
    pending_dkv = None
    for s in range(comm.world):
        pending_kv = comm.ring_exchange(kv, phase="bwd") if s < comm.world - 1 else None
        blocks = _blocks(spec, n, ring_src(comm.rank, s, comm.world))
        # this step's dK/dV go into a local buffer first, so the accumulator arriving with this K/V block
        # (fresh at step 0) is waited for only after the compute it travelled during
        local = torch.zeros(kv.shape, dtype=acc, device=q.device)
        pairs = blocks_backward(dout, q, kv[0], kv[1], out, lse, blocks, dq, local[0], local[1], spec)
        comm.stats.record_work("bwd", s, pairs)
        if s == 0:
            dkv = local
        else:
            dkv = pending_dkv.wait()
            if blocks:  # a skipped block passes the accumulator through untouched
                dkv += local
        pending_dkv = comm.ring_exchange(dkv, phase="bwd")
        if pending_kv is not None:
            kv = pending_kv.wait()
    dkv = pending_dkv.wait()  # after W hops: the gradient of this rank's own K/V
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


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


def ring_attention(q, k, v, spec: RingSpec):
    """Exact attention over ring-sharded q, k, v (local shards in spec.layout); returns (out, lse)."""
    return ScheduleFunction.apply(q, k, v, spec, ring_forward, ring_backward)

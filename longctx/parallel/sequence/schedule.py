"""What every sequence-parallel schedule shares: its spec, the kernel calls of one held K/V shard, and
the autograd Function that runs a (forward, backward) pair.

A schedule is a pair of functions `fwd(q, k, v, spec) -> (out, lse)` and `bwd(dout, q, k, v, out, lse,
spec) -> (dq, dk, dv)`. The ring family and all-gather differ only in how K/V shards arrive (ring hops or
one gather); the kernel calls a rank makes on a held shard come from the block planner (plan.py) in both.
Only q, k, v and the global out/lse are saved: the backward recomputes every block with the global
out/lse, which is what makes the distributed backward exact (docs/algorithms.md §2). With packed
documents the calls of a held shard come per run of sequences packed alike (`held`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ... import kernels
from ...kernels import acc_dtype
from ..comm import Comm
from .documents import Documents
from .plan import held_blocks


@dataclass(frozen=True, eq=False)
class ScheduleSpec:
    comm: Comm | None  # None: one device, nothing recorded
    layout: str
    causal: bool
    window: int | None
    scale: float
    kernel: str
    documents: Documents | None = None  # packed documents (natural order); None = one per sequence
    softcap: float | None = None  # logit soft-capping (kernels.registry): every block's scores capped alike


def held(spec: ScheduleSpec, n: int, world: int, rank: int, src: int, batch: int):
    """(batch rows, blocks) of the kernel calls `rank` makes on the K/V shard of `src`."""
    return held_blocks(spec.layout, n, world, rank, src, spec.causal, spec.window, spec.documents, batch)


def pack_kv(k, v):
    """K and V in one buffer, so that one transfer carries both: stacked (2, B, c, H, D) when equally wide,
    else side by side along the features (B, c, H, D_k + D_v) (multi-head latent attention)."""
    return torch.stack([k, v]) if k.shape == v.shape else torch.cat([k, v], -1)


def unpack_kv(kv, k_width: int):
    """(K, V) views of a pack_kv buffer, or of one shaped like it (the dK/dV accumulators)."""
    return (kv[0], kv[1]) if kv.dim() == 5 else (kv[..., :k_width], kv[..., k_width:])


def blocks_forward(q, k, v, groups, out, lse, spec: ScheduleSpec) -> int:
    """Run one held K/V shard's kernel calls and merge them into (out, lse); returns the pairs done."""
    pairs = 0
    for bs, blocks in groups:
        for b in blocks:
            o, l = kernels.forward(q[bs, b.q0:b.q1], k[bs, b.k0:b.k1], v[bs, b.k0:b.k1], scale=spec.scale,
                                   mask=b.mask, backend=spec.kernel, out_dtype=out.dtype, softcap=spec.softcap)
            kernels.merge_(out[bs], lse[bs], o, l, rows=slice(b.q0, b.q1))
            pairs += b.pairs * (bs.stop - bs.start)
    return pairs * q.shape[2]


def blocks_backward(dout, q, k, v, out, lse, groups, dq, dk, dv, spec: ScheduleSpec) -> int:
    """Block gradients with the global out/lse: dq += locally, dk/dv += into the travelling accumulator.
    Returns the pairs done."""
    pairs = 0
    for bs, blocks in groups:
        for b in blocks:
            rows = slice(b.q0, b.q1)
            gq, gk, gv = kernels.backward(dout[bs, rows], q[bs, rows], k[bs, b.k0:b.k1], v[bs, b.k0:b.k1],
                                          out[bs, rows], lse[bs, :, rows], scale=spec.scale, mask=b.mask,
                                          backend=spec.kernel, grad_dtype=dq.dtype, softcap=spec.softcap)
            dq[bs, rows] += gq
            dk[bs, b.k0:b.k1] += gk
            dv[bs, b.k0:b.k1] += gv
            pairs += b.pairs * (bs.stop - bs.start)
    return pairs * q.shape[2]


def local_forward(q, k, v, spec: ScheduleSpec):
    """The whole (gathered) sequence on one rank, natural order: the planner's blocks of one shard."""
    out, lse = kernels.empty_state(*q.shape[:3], v.shape[-1], device=q.device, dtype=acc_dtype(q.dtype))
    groups = held(spec, q.shape[1], 1, 0, 0, q.shape[0])
    pairs = blocks_forward(q, k, v, groups, out, lse, spec)
    if spec.comm is not None:
        spec.comm.stats.record_work("fwd", 0, pairs)
    return out.to(q.dtype), lse


def local_backward(dout, q, k, v, out, lse, spec: ScheduleSpec):
    acc = acc_dtype(q.dtype)
    dq, dk, dv = (torch.zeros(t.shape, dtype=acc, device=q.device) for t in (q, k, v))
    groups = held(spec, q.shape[1], 1, 0, 0, q.shape[0])
    pairs = blocks_backward(dout, q, k, v, out, lse, groups, dq, dk, dv, spec)
    if spec.comm is not None:
        spec.comm.stats.record_work("bwd", 0, pairs)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def local_attention(q, k, v, *, causal: bool, window, kernel: str, documents, scale: float | None = None,
                    comm: Comm | None = None, sinks=None, softcap: float | None = None):
    """A whole sequence on one rank through the planner's blocks of one shard (one call, or one per packed
    document); `comm`: where the work is recorded (None: nowhere); `sinks`: see run_schedule."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    spec = ScheduleSpec(comm, "contiguous", causal, window, scale, kernel, documents, kernels.check_softcap(softcap))
    return run_schedule(q, k, v, spec, local_forward, local_backward, sinks)[0]


def run_schedule(q, k, v, spec: ScheduleSpec, fwd, bwd, sinks=None):
    """(out, lse) of a schedule, differentiable in q, k, v and `sinks`: None, or one logit per query head of
    q (H,) for attention sinks (kernels.merge_sinks), merged into the global out/lse once, after every
    block, so every strategy supports them and the backward runs on the merged state."""
    check_sinks(sinks, q)
    return ScheduleFunction.apply(q, k, v, sinks, spec, fwd, bwd)


def check_sinks(sinks, q) -> None:
    """One logit per query head of q, a float on q's device; checked before any transfer of a schedule."""
    if sinks is None:
        return
    heads = q.shape[2]
    if not isinstance(sinks, torch.Tensor) or tuple(sinks.shape) != (heads,):
        shape = tuple(sinks.shape) if isinstance(sinks, torch.Tensor) else type(sinks).__name__
        raise ValueError(f"sinks must be a tensor of one logit per query head, shape ({heads},), got {shape}")
    if not sinks.is_floating_point():
        raise TypeError(f"sinks has dtype {sinks.dtype}; the logits must be floats: sinks.float()")
    if sinks.device != q.device:
        raise ValueError(f"sinks is on {sinks.device} but q is on {q.device}; move it with sinks.to(q.device)")


class ScheduleFunction(torch.autograd.Function):
    """Autograd for any schedule given as (forward(q, k, v, spec) -> (out, lse),
    backward(dout, q, k, v, out, lse, spec) -> (dq, dk, dv)): saves only q, k, v and the global out/lse.
    With sinks, the saved out/lse are the sink-merged ones: the kernels' backward with them is exact
    (lse is the whole softmax's normaliser), and the sinks' own gradient comes from the same state."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, spec, fwd, bwd):
        out, lse = fwd(q, k, v, spec)
        if sinks is not None:
            out, lse = kernels.merge_sinks(out, lse, sinks)
        ctx.save_for_backward(q, k, v, out, lse, sinks)
        ctx.spec, ctx.bwd = spec, bwd
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sinks = ctx.saved_tensors
        dout = dout.contiguous()
        dq, dk, dv = ctx.bwd(dout, q, k, v, out, lse, ctx.spec)
        dsinks = None if sinks is None else kernels.sinks_grad(dout, out, lse, sinks)
        return dq, dk, dv, dsinks, None, None, None



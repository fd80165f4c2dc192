"""Ulysses attention: all-to-all from sequence shards to head shards, full-sequence attention on W/H of
the heads, all-to-all back (DeepSpeed-Ulysses). When there are fewer KV heads than ranks, each KV head is
replicated to the ranks whose query heads use it; autograd sums the copies' gradients back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..comm import Comm
from .layouts import permutation
from .schedule import local_attention


def seq_to_heads(x: torch.Tensor, comm: Comm, phase: str) -> torch.Tensor:
    """(B, c, H, D) sequence shard -> (B, W*c, H/W, D): every rank's chunk (in rank order), my heads."""
    b, c, h, d = x.shape
    w = comm.world
    send = x.reshape(b, c, w, h // w, d).permute(2, 0, 1, 3, 4)
    recv = comm.all_to_all(send, phase=phase)
    return recv.permute(1, 0, 2, 3, 4).reshape(b, w * c, h // w, d)


def heads_to_seq(y: torch.Tensor, comm: Comm, phase: str) -> torch.Tensor:
    """Inverse of seq_to_heads: (B, W*c, H/W, D) -> (B, c, H, D)."""
    b, n, hl, d = y.shape
    w = comm.world
    send = y.reshape(b, w, n // w, hl, d).permute(1, 0, 2, 3, 4)
    recv = comm.all_to_all(send, phase=phase)
    return recv.permute(1, 2, 0, 3, 4).reshape(b, n // w, w * hl, d)


class SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return seq_to_heads(x, comm, "fwd")

    @staticmethod
    def backward(ctx, g):
        return heads_to_seq(g.contiguous(), ctx.comm, "bwd"), None


class HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, comm):
        ctx.comm = comm
        return heads_to_seq(y, comm, "fwd")

    @staticmethod
    def backward(ctx, g):
        return seq_to_heads(g.contiguous(), ctx.comm, "bwd"), None


@dataclass(frozen=True)
class HeadNames:
    """What the caller's user calls the head counts and the Ulysses degree, for check_heads' messages (the
    defaults are the training config's)."""

    heads: str = ""  # said after the query-head count, in parentheses, where set
    kv_heads: str = "model.n_kv_heads, per tensor-parallel rank"
    ranks: str = "a number of context ranks"
    hybrid_degree: str = "a hybrid ulysses degree"


CONFIG_HEAD_NAMES = HeadNames()


def check_heads(heads: int, kv_heads: int, world: int, what: str = "ulysses",
                names: HeadNames = CONFIG_HEAD_NAMES) -> int:
    """Validate head counts for a degree-`world` head split; return the KV replication factor."""
    # the ulysses strategy splits the heads over every context rank: its degree is their count (parallel.cp,
    # --world-size, --nproc); hybrid's is a setting of its own
    degree = names.hybrid_degree if what == "hybrid ulysses" else names.ranks
    if heads % world:
        fits = max(d for d in range(1, world + 1) if heads % d == 0)
        said = f" ({names.heads})" if names.heads else ""
        raise ValueError(f"{what}: {heads} query heads{said} do not divide over {world} ranks; use {degree} that "
                         f"divides the heads (e.g. {fits}), or the ring/zigzag strategy")
    if kv_heads % world == 0:
        return 1
    if world % kv_heads == 0:
        return world // kv_heads
    raise ValueError(
        f"{what}: {kv_heads} kv heads ({names.kv_heads}) neither divide over {world} "
        f"ranks nor replicate evenly onto them; use {degree} that divides the kv heads or is a multiple of them, "
        "or the ring/zigzag strategy"
    )


def replicate_kv(k, v, rep: int):
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def heads_of(sinks, comm: Comm):
    """This rank's part of a per-head tensor after seq_to_heads (its H/W consecutive heads), or None."""
    return None if sinks is None else sinks.view(comm.world, -1)[comm.rank]


def ulysses_attention(q, k, v, *, comm: Comm, layout: str, causal: bool, window, scale, kernel, documents=None,
                      sinks=None, softcap=None):
    rep = check_heads(q.shape[2], k.shape[2], comm.world)
    k, v = replicate_kv(k, v, rep)
    qh, kh, vh = (SeqToHeads.apply(t, comm) for t in (q, k, v))
    n = qh.shape[1]
    if layout != "contiguous":  # the gathered sequence is in layout order: attend in natural order
        perm = permutation(layout, n, comm.world).to(q.device)
        inv = torch.empty_like(perm)
        inv[perm] = torch.arange(n, device=q.device)
        qh, kh, vh = (t.index_select(1, inv) for t in (qh, kh, vh))
    # the whole sequence on my heads: the planner's blocks of one shard (one call, or one per document)
    out = local_attention(qh, kh, vh, causal=causal, window=window, kernel=kernel, documents=documents, scale=scale,
                          comm=comm, sinks=heads_of(sinks, comm), softcap=softcap)
    if layout != "contiguous":
        out = out.index_select(1, perm)
    return HeadsToSeq.apply(out, comm)

"""Hybrid Ulysses x ring attention (2D context parallelism, as in USP).

The sequence is first split over the ring ranks by the ring layout (contiguous, zigzag or striped), then
each ring shard contiguously over the ulysses ranks. An all-to-all inside each ulysses group turns the
sequence shards into the whole ring shard for 1/u of the heads; the ring schedule then runs over the ring
group on those heads, and a second all-to-all turns heads back into sequence.
"""

from __future__ import annotations

import torch

from ..comm import Comm
from .registry import REGISTRY
from .ring import ring_attention
from .schedule import ScheduleSpec
from .ulysses import HeadsToSeq, SeqToHeads, check_heads, heads_of, replicate_kv


def hybrid_positions(ring_layout: str, n: int, ring_world: int, ulysses_world: int, ring_rank: int,
                     ulysses_rank: int) -> torch.Tensor:
    """Global positions held by the rank at (ring_rank, ulysses_rank)."""
    strat, world = REGISTRY["hybrid"], ring_world * ulysses_world
    strat.check(seq_len=n, world=world, layout=strat.layout(ring_layout), ulysses=ulysses_world)
    return strat.rank_positions(ring_layout, n, world, ring_rank * ulysses_world + ulysses_rank, ulysses_world)


def shard_hybrid(x: torch.Tensor, ring_layout: str, ulysses_comm: Comm, ring_comm: Comm, dim: int = 1):
    pos = hybrid_positions(ring_layout, x.shape[dim], ring_comm.world, ulysses_comm.world, ring_comm.rank,
                           ulysses_comm.rank)
    return x.index_select(dim, pos.to(x.device))


def hybrid_attention(q, k, v, *, ulysses_comm: Comm, spec: ScheduleSpec, sinks=None):
    """q, k, v: this rank's hybrid shard (B, c, H, D); spec: the ring part (its comm is the ring group)."""
    rep = check_heads(q.shape[2], k.shape[2], ulysses_comm.world, what="hybrid ulysses")
    k, v = replicate_kv(k, v, rep)
    qh, kh, vh = (SeqToHeads.apply(t, ulysses_comm) for t in (q, k, v))
    out, _ = ring_attention(qh, kh, vh, spec, heads_of(sinks, ulysses_comm))
    return HeadsToSeq.apply(out, ulysses_comm)

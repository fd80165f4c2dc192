"""Token layouts for sequence parallelism: which global positions each rank holds.

  contiguous  rank r holds [r*c, (r+1)*c)
  zigzag      2W chunks of h = N/(2W); rank r holds chunk r then chunk 2W-1-r (balanced causal work)
  striped     rank r holds positions r, r+W, r+2W, ... (token t on rank t mod W)

Every layout lists a rank's positions in increasing order, which is what lets the block planner describe
any (query shard, key shard) pair with band masks. One implementation serves the data path (shard the
batch, its labels and position ids), the model (RoPE must see true positions) and the tests.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.distributed as dist

LAYOUTS = ("contiguous", "zigzag", "striped")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def divisor(layout: str, world: int) -> int:
    """The sequence length must be a multiple of this for the layout to split evenly."""
    return 2 * world if check_layout(layout) == "zigzag" else world


def check_seq(layout: str, n: int, world: int, what: str = "sequence length") -> int:
    """Validate n for the layout; return tokens per rank."""
    m = divisor(layout, world)
    if n % m != 0:
        pad = (-n) % m
        raise ValueError(
            f"{what} {n} is not divisible by {m} (the {layout} layout over {world} ranks needs a multiple "
            f"of {m}); pad it by {pad} tokens to {n + pad}"
        )
    return n // world


@lru_cache(maxsize=512)
def _positions(layout: str, n: int, world: int, rank: int) -> torch.Tensor:
    c = check_seq(layout, n, world)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside a world of {world} ranks")
    if layout == "contiguous":
        return torch.arange(rank * c, (rank + 1) * c)
    if layout == "striped":
        return torch.arange(rank, n, world)
    h = c // 2
    first = torch.arange(rank * h, (rank + 1) * h)
    second = torch.arange((2 * world - 1 - rank) * h, (2 * world - rank) * h)
    return torch.cat([first, second])


def positions(layout: str, n: int, world: int, rank: int) -> torch.Tensor:
    """Global positions held by `rank`, increasing. These are also the RoPE position ids."""
    return _positions(check_layout(layout), n, world, rank).clone()  # callers may edit; the cache must not change


def permutation(layout: str, n: int, world: int) -> torch.Tensor:
    """perm with x_layout = x_natural[perm]: all ranks' shards concatenated in rank order."""
    return torch.cat([positions(layout, n, world, r) for r in range(world)])


def _rank_world(group, rank, world):
    if rank is not None and world is not None:
        return rank, world
    if not dist.is_initialized():
        raise RuntimeError(
            "no process group: call torch.distributed.init_process_group (or run inside longctx.launch.run), "
            "or pass rank= and world= explicitly"
        )
    return dist.get_rank(group), dist.get_world_size(group)


def _hybrid_mesh(group):
    """(ulysses group, ring group) of a hybrid strategy's ("ring", "ulysses") mesh or group pair, else None."""
    from .mesh import hybrid_groups, is_hybrid_group

    return hybrid_groups(group)[:2] if is_hybrid_group(group) else None


def _hybrid_rank_positions(hybrid, layout: str, n: int) -> torch.Tensor:
    """Global positions of this rank's hybrid shard of an n-token sequence; `hybrid`: _hybrid_mesh's groups."""
    from .hybrid import hybrid_positions

    ulysses_group, ring_group = hybrid
    return hybrid_positions(layout, n, dist.get_world_size(ring_group), dist.get_world_size(ulysses_group),
                            dist.get_rank(ring_group), dist.get_rank(ulysses_group))


def shard(x: torch.Tensor, layout: str = "contiguous", *, group=None, rank=None, world=None, dim: int = 1):
    """This rank's part of a full-sequence tensor (sequence along `dim`). With the hybrid strategy's
    `group=context_mesh(ring, ulysses)` the part hybrid runs on: `layout` is its ring's, split again over the
    Ulysses ranks (a plain `layout` cut over all ranks is another set of positions)."""
    hybrid = _hybrid_mesh(group)
    if hybrid is not None:
        return x.index_select(dim, _hybrid_rank_positions(hybrid, layout, x.shape[dim]).to(x.device))
    rank, world = _rank_world(group, rank, world)
    n = x.shape[dim]
    check_seq(layout, n, world, what=f"sequence length (x.shape[{dim}])")
    if layout == "contiguous":
        c = n // world
        return x.narrow(dim, rank * c, c)
    return x.index_select(dim, positions(layout, n, world, rank).to(x.device))


def unshard(local: torch.Tensor, layout: str = "contiguous", *, group=None, dim: int = 1):
    """Gather every rank's shard and restore natural order (through the comm layer's all-gather); `group` as
    given to `shard` (the hybrid mesh too)."""
    from ..comm import Comm

    hybrid = _hybrid_mesh(group)
    if hybrid is not None:
        return _unshard_hybrid(local, layout, *hybrid, dim)
    comm = Comm.get(group)
    parts = comm.all_gather(local.contiguous(), phase="data")
    x = torch.cat(parts, dim=dim)
    if layout == "contiguous":
        return x
    return _in_natural_order(x, permutation(layout, x.shape[dim], comm.world), dim)


def _in_natural_order(x: torch.Tensor, perm: torch.Tensor, dim: int) -> torch.Tensor:
    """x (the shards concatenated, positions `perm` along `dim`) in natural order."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel())
    return x.index_select(dim, inv.to(x.device))


def _unshard_hybrid(local: torch.Tensor, layout: str, ulysses_group, ring_group, dim: int) -> torch.Tensor:
    """Gather over the Ulysses ranks, then the ring: parts in (ring rank, Ulysses rank) order."""
    from ..comm import Comm
    from .hybrid import hybrid_positions

    inner = torch.cat(Comm.get(ulysses_group).all_gather(local.contiguous(), phase="data"), dim=dim)
    x = torch.cat(Comm.get(ring_group).all_gather(inner, phase="data"), dim=dim)
    ring, ulysses = dist.get_world_size(ring_group), dist.get_world_size(ulysses_group)
    perm = torch.cat([hybrid_positions(layout, x.shape[dim], ring, ulysses, r, u)
                      for r in range(ring) for u in range(ulysses)])
    return _in_natural_order(x, perm, dim)


def shard_batch(input_ids: torch.Tensor, labels: torch.Tensor | None = None, layout: str = "contiguous", *,
                group=None, rank=None, world=None) -> dict:
    """Shard a (batch, seq) token batch: input ids, labels (already shifted in natural order) and the
    position ids RoPE needs. Labels are shifted before sharding: a shard's last token's target lives on
    another rank in every layout but contiguous. `group` may be the hybrid strategy's
    `context_mesh(ring, ulysses)`: the shards and positions are then hybrid's (as `shard` cuts them)."""
    hybrid = _hybrid_mesh(group)
    if hybrid is not None:
        pos = _hybrid_rank_positions(hybrid, layout, input_ids.shape[1]).to(input_ids.device)
        out = {"input_ids": input_ids.index_select(1, pos), "position_ids": pos}
        if labels is not None:
            out["labels"] = labels.index_select(1, pos)
        return out
    rank, world = _rank_world(group, rank, world)
    out = {"input_ids": shard(input_ids, layout, rank=rank, world=world),
           "position_ids": positions(layout, input_ids.shape[1], world, rank).to(input_ids.device)}
    if labels is not None:
        out["labels"] = shard(labels, layout, rank=rank, world=world)
    return out

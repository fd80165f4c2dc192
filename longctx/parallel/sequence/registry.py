"""One registry of sequence-parallel strategies, like the kernel registry: name, layout rule, schedule,
validation and cost model in one entry, so the API, the plan, the benchmarks and the cost models cannot
disagree about what a strategy needs.

  strategy   layouts (first = default)          runs
  ring       contiguous                          ring loop, contiguous block table
  zigzag     zigzag                              ring loop, zigzag block table (balanced causal)
  striped    striped                             ring loop, striped block table
  allgather  zigzag | contiguous | striped       one K/V all-gather, same block tables per source shard
  ulysses    contiguous | zigzag | striped       all-to-all seq -> heads, full attention, back
  hybrid     zigzag | contiguous | striped       ulysses inside a ring shard, then the ring loop over rings
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from . import cost
from .layouts import LAYOUTS, check_layout, divisor, positions
from .plan import imbalance, step_blocks, work_table
from .ulysses import CONFIG_HEAD_NAMES, HeadNames, check_heads


@dataclass(frozen=True)
class Strategy:
    name: str
    layouts: tuple[str, ...]  # the layouts its shards may follow; the first is the default
    summary: str
    heads_split: bool = False  # heads are split over (part of) the context ranks: they must divide
    comm: Callable | None = None  # (world, ulysses, b, n, h, hkv, d, e, acc, dv) -> bytes/calls dict

    @property
    def default_layout(self) -> str:
        return self.layouts[0]

    def layout(self, layout: str | None = None) -> str:
        """The layout shards follow: the given one if this strategy runs on it, else an error."""
        if layout is None:
            return self.default_layout
        check_layout(layout)
        if layout not in self.layouts:
            raise ValueError(
                f"layout mismatch: strategy {self.name!r} runs on the {self.default_layout!r} layout, got "
                f"layout={layout!r}; use that layout (parallel.layout={self.default_layout}, or "
                f"longctx.parallel.shard(x, {self.default_layout!r}) in Python) or a strategy that runs on "
                f"{layout!r} ({', '.join(strategies_for_layout(layout))})"
            )
        return layout

    def seq_divisor(self, world: int, layout: str, ulysses: int = 1) -> int:
        """The global sequence length must be a multiple of this."""
        if self.name == "hybrid":
            ring = world // ulysses
            return math.lcm(divisor(layout, ring), world)
        return divisor(layout, world)

    def check(self, *, seq_len: int | None, world: int, layout: str, heads: int | None = None,
              kv_heads: int | None = None, ulysses: int = 1, what: str = "sequence length",
              head_names: HeadNames = CONFIG_HEAD_NAMES) -> None:
        """Every constraint of running this strategy (seq_len / heads None: not checked); messages name the
        fix (the head counts and degrees as `head_names` calls them)."""
        if self.name == "hybrid":
            if world % ulysses:
                raise ValueError(f"hybrid: ulysses degree {ulysses} does not divide the {world} context ranks; "
                                 f"pick a ulysses degree that divides {world}")
        elif ulysses != 1:
            raise ValueError(f"a ulysses degree ({ulysses}) only applies to strategy 'hybrid', not "
                             f"{self.name!r}; set ulysses=1 or strategy='hybrid'")
        m = self.seq_divisor(world, layout, ulysses)
        if seq_len is not None and seq_len % m:
            pad = (-seq_len) % m
            raise ValueError(
                f"{what} {seq_len} is not divisible by {m} (strategy {self.name!r} with the {layout} layout over "
                f"{world} context ranks needs a multiple of {m}); pad it by {pad} tokens to {seq_len + pad}"
            )
        if heads is not None and self.heads_split:
            degree = ulysses if self.name == "hybrid" else world
            check_heads(heads, kv_heads or heads, degree, what="hybrid ulysses" if self.name == "hybrid" else
                        "ulysses", names=head_names)

    def rank_positions(self, layout: str, n: int, world: int, rank: int, ulysses: int = 1):
        """Global token positions held by context rank `rank` (hybrid: rank = ring_rank * ulysses + u)."""
        if self.name != "hybrid" or ulysses == 1:
            return positions(layout, n, world, rank)
        ring_pos = positions(layout, n, world // ulysses, rank // ulysses)
        cu = ring_pos.numel() // ulysses
        u = rank % ulysses
        return ring_pos[u * cu:(u + 1) * cu]

    def comm_model(self, *, world, batch, seq_len, heads, kv_heads, head_dim, dtype_bytes, layout=None,
                   ulysses=None, v_head_dim=None) -> dict:
        layout = self.layout(layout)
        acc = 8 if dtype_bytes == 8 else 4
        u = ulysses or 1
        self.check(seq_len=seq_len, world=world, layout=layout, heads=heads, kv_heads=kv_heads,
                   ulysses=u if self.name == "hybrid" else 1)
        return self.comm(world, u, batch, seq_len, heads, kv_heads, head_dim, dtype_bytes, acc, v_head_dim)

    def work_table(self, *, world, seq_len, causal, window=None, layout=None, ulysses=None,
                   starts=None) -> list[list[int]]:
        """pairs[step][rank] per batch element and head, as the planner schedules them (`starts`: where
        packed documents begin, None = one document)."""
        layout = self.layout(layout)
        self.check(seq_len=seq_len, world=world, layout=layout, ulysses=(ulysses or 1) if self.name == "hybrid" else 1)
        if self.name == "ulysses":
            return [[sum(b.pairs for b in step_blocks("contiguous", seq_len, 1, 0, 0, causal, window, starts))] * world]
        if self.name == "hybrid":
            return work_table(layout, seq_len, world // (ulysses or 1), causal, window, starts)
        table = work_table(layout, seq_len, world, causal, window, starts)
        if self.name == "allgather":  # no steps: each rank's total is its critical path
            table = [[sum(row[r] for row in table) for r in range(world)]]
        return table


def _ring(world, u, b, n, h, hkv, d, e, acc, dv):
    return cost.ring_family_bytes(world, b, n // world, hkv, d, e, acc, dv)


def _allgather(world, u, b, n, h, hkv, d, e, acc, dv):
    return cost.allgather_bytes(world, b, n // world, hkv, d, e, acc, dv)


def _ulysses(world, u, b, n, h, hkv, d, e, acc, dv):
    return cost.ulysses_bytes(world, b, n // world, h, hkv, d, e, dv)


def _hybrid(world, u, b, n, h, hkv, d, e, acc, dv):
    return cost.hybrid_bytes(world // u, u, b, n, h, hkv, d, e, acc, dv)


_ALL = ("contiguous", "zigzag", "striped")
REGISTRY: dict[str, Strategy] = {s.name: s for s in (
    Strategy("ring", ("contiguous",), "ring loop over contiguous shards (unbalanced under a causal mask)",
             comm=_ring),
    Strategy("zigzag", ("zigzag",), "ring loop over zigzag shards (balanced causal work)", comm=_ring),
    Strategy("striped", ("striped",), "ring loop over striped shards (balanced; best with windows)", comm=_ring),
    Strategy("allgather", ("zigzag", "contiguous", "striped"), "K/V gathered once, overlapped with own shard",
             comm=_allgather),
    Strategy("ulysses", ("contiguous", "zigzag", "striped"), "all-to-all sequence -> heads (DeepSpeed-Ulysses)",
             heads_split=True, comm=_ulysses),
    Strategy("hybrid", ("zigzag", "contiguous", "striped"), "ulysses inside ring shards, ring across (USP)",
             heads_split=True, comm=_hybrid),
)}
STRATEGIES = tuple(REGISTRY)
assert set(_ALL) == set(LAYOUTS)


def get_strategy(name: str) -> Strategy:
    if name not in REGISTRY:
        import difflib

        close = difflib.get_close_matches(str(name), STRATEGIES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown strategy {name!r}{hint}; choose one of {', '.join(STRATEGIES)}")
    return REGISTRY[name]


def strategies_for_layout(layout: str) -> list[str]:
    return [s.name for s in REGISTRY.values() if layout in s.layouts]


def strategy_layout(strategy: str, layout: str | None = None) -> str:
    """The token layout a strategy runs on: its default when none is given; a layout it does not accept is an
    error naming the ones it does."""
    return get_strategy(strategy).layout(layout)


def comm_model(strategy: str, *, world: int, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
               dtype_bytes: int, layout: str | None = None, ulysses: int | None = None,
               v_head_dim: int | None = None) -> dict:
    """Bytes and calls one rank sends, forward and backward, for one attention call (`v_head_dim`: v's head
    width where it differs from q/k's `head_dim`)."""
    return get_strategy(strategy).comm_model(world=world, batch=batch, seq_len=seq_len, heads=heads,
                                             kv_heads=kv_heads, head_dim=head_dim, dtype_bytes=dtype_bytes,
                                             layout=layout, ulysses=ulysses, v_head_dim=v_head_dim)


def work_model(strategy: str, *, world: int, seq_len: int, causal: bool, window: int | None = None,
               layout: str | None = None, ulysses: int | None = None, starts: tuple[int, ...] | None = None) -> dict:
    """Counted balance: per-step pairs per rank (per batch element and head) and the imbalance ratio
    (critical path, with ranks waiting for the slowest at every step, over an even split); `starts`: a
    sequence packed with documents beginning there."""
    table = get_strategy(strategy).work_table(world=world, seq_len=seq_len, causal=causal, window=window,
                                              layout=layout, ulysses=ulysses, starts=starts)
    return {"table": table, "imbalance": imbalance(table)}

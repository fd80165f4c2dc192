"""Per-step block tables: which kernel calls a rank makes on the K/V it holds.

Schedules of the ring family differ only in their token layout; the table of kernel calls for every
(rank, step) is derived here from the global positions the two shards hold. For a query shard with
positions qp and a key shard with positions kp (both increasing), each query row sees an interval of
keys [lo_i, hi_i); the rows are then cut greedily into few rectangular blocks (one for every table below),
each described by one band Mask. This reproduces the hand-written tables of docs/algorithms.md §4 (contiguous: diag /
full / skip; striped: causal / shifted causal; zigzag: one causal block, then `q x k[:h]` or
`q[h:] x k`) and extends them to sliding windows, where blocks outside the window are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from ...kernels import Mask
from .layouts import check_seq, positions


@dataclass(frozen=True)
class Block:
    """One kernel call: local query rows [q0, q1) against local key rows [k0, k1) of the held shard."""

    q0: int
    q1: int
    k0: int
    k1: int
    mask: Mask

    @property
    def pairs(self) -> int:
        return self.mask.band_pairs(self.q1 - self.q0, self.k1 - self.k0)


def row_intervals(qp: torch.Tensor, kp: torch.Tensor, causal: bool, window: int | None):
    """Allowed key interval [lo, hi) per query row, from global positions."""
    n_k = kp.numel()
    if window is None:
        lo = torch.zeros_like(qp)
    else:
        lo = torch.searchsorted(kp, qp - (window - 1))
    if causal:
        hi = torch.searchsorted(kp, qp, right=True)
    elif window is not None:
        hi = torch.searchsorted(kp, qp + (window - 1), right=True)
    else:
        hi = torch.full_like(qp, n_k)
    return lo, torch.maximum(hi, lo)


def _band(lo, hi, a: int, k0: int, k1: int):
    """If rows a.. with intervals (lo, hi) form one band over keys [k0, k1), return its Mask, else None."""
    i = torch.arange(a, a + lo.numel())
    lower = lo > k0
    upper = hi < k1
    A = B = None
    if lower.any():
        vals = (lo - i)[lower]
        if (vals != vals[0]).any():
            return None
        A = int(vals[0])
        if ((i + A)[~lower] > k0).any():
            return None
    if upper.any():
        vals = (hi - i)[upper]
        if (vals != vals[0]).any():
            return None
        B = int(vals[0])
        if ((i + B)[~upper] < k1).any():
            return None
    # in block coordinates (i' = i - a, j' = j - k0): j' >= i' + a + A - k0 and j' <= i' + a + B - 1 - k0
    if B is not None:
        off = a + B - 1 - k0
        left = None if A is None else B - 1 - A
        return Mask(left=left, right=0, offset=off)
    if A is not None:
        return Mask(left=0, right=None, offset=a + A - k0)
    return Mask.none()


def blocks_from_intervals(lo: torch.Tensor, hi: torch.Tensor) -> list[Block]:
    """Cut rows into band blocks: greedy, rows in order; a run that is not one band is halved until it is."""
    out: list[Block] = []
    n = lo.numel()
    nonempty = hi > lo
    a = 0
    while a < n:
        if not nonempty[a]:
            a += 1
            continue
        end = a
        while end < n and nonempty[end]:
            end += 1
        # the longest prefix [a, b) of this run that is one band: try the whole run first
        b = end
        while True:
            k0, k1 = int(lo[a:b].min()), int(hi[a:b].max())
            m = _band(lo[a:b], hi[a:b], a, k0, k1)
            if m is not None:
                break
            b = a + max(1, (b - a) // 2) if b - a > 1 else b
        if m.is_full(b - a, k1 - k0):
            m = Mask.none()
        out.append(Block(a, b, k0, k1, m))
        a = b
    return out


def plan_blocks(qp: torch.Tensor, kp: torch.Tensor, causal: bool, window: int | None) -> list[Block]:
    lo, hi = row_intervals(qp, kp, causal, window)
    return blocks_from_intervals(lo, hi)


def document_blocks(qp: torch.Tensor, kp: torch.Tensor, causal: bool, window: int | None, starts: tuple[int, ...],
                    n: int) -> list[Block]:
    """Band blocks of each document's rectangle alone (its rows of the query shard x its keys of the key
    shard, both contiguous local ranges): no call crosses a boundary, so the kernels need no document mask,
    and a document absent from either shard costs nothing."""
    bounds = torch.tensor((*starts, n))
    rows = torch.searchsorted(qp, bounds).tolist()
    keys = torch.searchsorted(kp, bounds).tolist()
    out: list[Block] = []
    for d in range(len(starts)):
        r0, r1, k0, k1 = rows[d], rows[d + 1], keys[d], keys[d + 1]
        if r0 == r1 or k0 == k1:
            continue
        for b in plan_blocks(qp[r0:r1], kp[k0:k1], causal, window):
            out.append(Block(b.q0 + r0, b.q1 + r0, b.k0 + k0, b.k1 + k0, b.mask))
    return out


@lru_cache(maxsize=4096)
def step_blocks(layout: str, n: int, world: int, rank: int, src: int, causal: bool,
                window: int | None = None, starts: tuple[int, ...] | None = None) -> tuple[Block, ...]:
    """Kernel calls rank `rank` makes on the K/V shard of rank `src` (cached: tables are static per
    packing). `starts`: where packed documents begin (natural order), None = one document."""
    check_seq(layout, n, world)
    qp = positions(layout, n, world, rank)
    kp = positions(layout, n, world, src)
    if starts is not None:
        return tuple(document_blocks(qp, kp, causal, window, starts, n))
    return tuple(plan_blocks(qp, kp, causal, window))


def held_blocks(layout: str, n: int, world: int, rank: int, src: int, causal: bool, window: int | None,
                documents, batch: int) -> list[tuple[slice, tuple[Block, ...]]]:
    """(batch rows, blocks) for a held K/V shard: one entry for the whole batch, or one per run of sequences
    packed alike (`documents`: a Documents, or None)."""
    if documents is None:
        return [(slice(0, batch), step_blocks(layout, n, world, rank, src, causal, window))]
    documents.check_seq_len(n)
    return [(rows, step_blocks(layout, n, world, rank, src, causal, window, starts))
            for rows, starts in documents.groups(batch)]


def ring_src(rank: int, step: int, world: int) -> int:
    """At step s of a ring, rank r holds the K/V shard of rank (r - s) mod W."""
    return (rank - step) % world


def work_table(layout: str, n: int, world: int, causal: bool, window: int | None = None,
               starts: tuple[int, ...] | None = None) -> list[list[int]]:
    """pairs[s][r]: (query, key) pairs rank r computes at ring step s (per batch element and head); with
    `starts`, for a sequence packed with documents beginning there."""
    return [[sum(b.pairs for b in step_blocks(layout, n, world, r, ring_src(r, s, world), causal, window, starts))
             for r in range(world)] for s in range(world)]


def imbalance(table: list[list[int]]) -> float:
    """Critical path (ranks wait for the slowest at every step) over the ideal even split."""
    total = sum(sum(row) for row in table)
    world = len(table[0])
    critical = sum(max(row) for row in table)
    return critical / (total / world) if total else 1.0

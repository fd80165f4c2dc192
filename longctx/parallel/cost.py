"""Closed-form communication and work models (algorithms.md sections 2.4, 2.5, 3.4, 4.4).

Bytes are per rank, in the counting convention of comm.py; every rank of a schedule moves the same
amount, so this is also the most any rank sent. Tests assert exact equality with the counters.
"""

from __future__ import annotations

from ..kernels import Mask
from .layouts import check_seq
from .plan import imbalance, work_table
from .ulysses import check_heads


def _ring_family(world, b, c, hkv, d, e, acc):
    kv = 2 * b * c * hkv * d * e
    dkv = 2 * b * c * hkv * d * acc
    if world == 1:
        return {"fwd_bytes": 0, "fwd_calls": 0, "bwd_bytes": 0, "bwd_calls": 0}
    return {"fwd_bytes": (world - 1) * kv, "fwd_calls": world - 1,
            "bwd_bytes": (world - 1) * kv + world * dkv, "bwd_calls": (world - 1) + world}


def _allgather(world, b, c, hkv, d, e, acc):
    kv = 2 * b * c * hkv * d * e
    dkv = 2 * b * c * hkv * d * acc
    if world == 1:
        return {"fwd_bytes": 0, "fwd_calls": 0, "bwd_bytes": 0, "bwd_calls": 0}
    return {"fwd_bytes": (world - 1) * kv, "fwd_calls": 1,
            "bwd_bytes": (world - 1) * (kv + dkv), "bwd_calls": 2}


def _ulysses(world, b, c, h, hkv, d, e):
    if world == 1:
        return {"fwd_bytes": 0, "fwd_calls": 0, "bwd_bytes": 0, "bwd_calls": 0}
    hkv = hkv * check_heads(h, hkv, world)
    q = b * c * h * d * e
    kv = b * c * hkv * d * e
    # q, k, v in and out back; the backward mirrors it (dout in; dq, dk, dv back)
    per = (world - 1) * q // world * 2 + (world - 1) * kv // world * 2
    return {"fwd_bytes": per, "fwd_calls": 4, "bwd_bytes": per, "bwd_calls": 4}


def _add(a, b):
    return {k: a[k] + b[k] for k in a}


def comm_model(strategy: str, *, world: int, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
               dtype_bytes: int, layout: str | None = None, ulysses: int | None = None) -> dict:
    """Bytes and calls one rank sends, forward and backward, for one attention call."""
    from .api import strategy_layout

    acc = 8 if dtype_bytes == 8 else 4
    layout = strategy_layout(strategy, layout)
    b, h, hkv, d, e = batch, heads, kv_heads, head_dim, dtype_bytes
    if strategy == "hybrid":
        u = ulysses or 1
        p = world // u
        cr = seq_len // p
        rep = check_heads(h, hkv, u)
        part_u = _ulysses(u, b, cr // u, h, hkv, d, e)
        part_r = _ring_family(p, b, cr, hkv * rep // u, d, e, acc)
        return _add(part_u, part_r)
    c = check_seq(layout, seq_len, world) if strategy != "ulysses" else seq_len // world
    if strategy == "ulysses":
        return _ulysses(world, b, c, h, hkv, d, e)
    if strategy == "allgather":
        return _allgather(world, b, c, hkv, d, e, acc)
    return _ring_family(world, b, c, hkv, d, e, acc)


def work_model(strategy: str, *, world: int, seq_len: int, causal: bool, window: int | None = None,
               layout: str | None = None, ulysses: int | None = None) -> dict:
    """Counted balance: per-step pairs per rank (per batch element and head) and the imbalance ratio
    (critical path, with ranks waiting for the slowest at every step, over an even split)."""
    from .api import strategy_layout

    layout = strategy_layout(strategy, layout)
    if strategy == "ulysses":
        pairs = Mask.from_flags(causal, window).band_pairs(seq_len, seq_len)
        table = [[pairs] * world]
    elif strategy == "hybrid":
        table = work_table(layout, seq_len, world // (ulysses or 1), causal, window)
    else:
        table = work_table(layout, seq_len, world, causal, window)
        if strategy == "allgather":  # no steps: each rank's total is its critical path
            table = [[sum(row[r] for row in table) for r in range(world)]]
    return {"table": table, "imbalance": imbalance(table)}

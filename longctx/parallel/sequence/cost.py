"""Closed-form communication models (docs/algorithms.md §12), one function per schedule family.

Bytes are per rank, in the counting convention of comm.py; every rank of a schedule moves the same
amount, so this is also the most any rank sent. Tests assert exact equality with the counters. The
registry (registry.py) picks the function for a strategy; nothing here calls the schedules. `d` is the
q/k head width, `dv` the v (and output) head width where it differs (multi-head latent attention).
"""

from __future__ import annotations

from .ulysses import check_heads

ZERO = {"fwd_bytes": 0, "fwd_calls": 0, "bwd_bytes": 0, "bwd_calls": 0}


def ring_family_bytes(world, b, c, hkv, d, e, acc, dv=None) -> dict:
    """K/V hop W-1 times each pass; the fp32 dK/dV accumulator rides W hops home in the backward."""
    if world == 1:
        return dict(ZERO)
    kv = b * c * hkv * (d + (d if dv is None else dv)) * e
    dkv = kv // e * acc
    return {"fwd_bytes": (world - 1) * kv, "fwd_calls": world - 1,
            "bwd_bytes": (world - 1) * kv + world * dkv, "bwd_calls": (world - 1) + world}


def allgather_bytes(world, b, c, hkv, d, e, acc, dv=None) -> dict:
    """One K/V all-gather per pass; one reduce-scatter of the fp32 dK/dV."""
    if world == 1:
        return dict(ZERO)
    kv = b * c * hkv * (d + (d if dv is None else dv)) * e
    dkv = kv // e * acc
    return {"fwd_bytes": (world - 1) * kv, "fwd_calls": 1,
            "bwd_bytes": (world - 1) * (kv + dkv), "bwd_calls": 2}


def ulysses_bytes(world, b, c, h, hkv, d, e, dv=None) -> dict:
    """q, k, v in and the output back (four all-to-alls); the backward mirrors it (dout in; dq, dk, dv)."""
    if world == 1:
        return dict(ZERO)
    hkv = hkv * check_heads(h, hkv, world)
    # q and k are d wide; v, the output and their gradients dv wide
    sent = [b * c * heads * width * e for heads in (h, hkv) for width in (d, d if dv is None else dv)]
    per = sum((world - 1) * nbytes // world for nbytes in sent)
    return {"fwd_bytes": per, "fwd_calls": 4, "bwd_bytes": per, "bwd_calls": 4}


def hybrid_bytes(ring, ulysses, b, n, h, hkv, d, e, acc, dv=None) -> dict:
    """Ulysses inside each ring rank's shard, then the ring family over the heads a rank then holds."""
    cr = n // ring
    rep = check_heads(h, hkv, ulysses, what="hybrid ulysses")
    part_u = ulysses_bytes(ulysses, b, cr // ulysses, h, hkv, d, e, dv)
    part_r = ring_family_bytes(ring, b, cr, hkv * rep // ulysses, d, e, acc, dv)
    return {k: part_u[k] + part_r[k] for k in part_u}

"""Rank-side code for the dilated-attention tests, and the independent dense reference they check against."""

from __future__ import annotations

import math

import torch

from longctx import kernels
from longctx.parallel.sequence.dilated import dilated_attention
from longctx.parallel.sequence.dilated_dist import dilated_comms
from tests.support.backends import report


def dense_reference(q, k, v, segment_lengths, dilation_rates, causal):
    """LongNet's mixture written as ONE softmax over the multiset union of every pattern's keys of a row:
    weights exp(s_ij) * count_ij / sum_j exp(s_ij) * count_ij, count_ij = number of patterns in which query
    i (of head h) sees key j. Built from the definition (per-head offset h mod r), nothing shared with the
    implementation; differentiable, so autograd gives the reference gradients."""
    b, n, h, d = q.shape
    rep = h // k.shape[2]
    kr, vr = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    i = torch.arange(n)
    count = torch.zeros(h, n, n, dtype=q.dtype)
    for w, r in zip(segment_lengths, dilation_rates):
        w = min(w, n)
        seg = (i[:, None] // w) == (i[None, :] // w)
        for head in range(h):
            off = head % r
            sel = ((i % w) % r == off)
            ok = seg & sel[:, None] & sel[None, :]
            if causal:
                ok &= i[None, :] <= i[:, None]
            count[head] += ok
    s = torch.einsum("bihd,bjhd->bhij", q, kr) / math.sqrt(d)
    logits = torch.where(count > 0, s + torch.log(count), torch.full_like(s, -math.inf))
    m = logits.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m)).detach()
    e = torch.exp(logits - m)
    den = e.sum(-1, keepdim=True)
    p = e / torch.where(den > 0, den, torch.ones_like(den))
    return torch.einsum("bhij,bjhd->bihd", p, vr)


def problem(b, n, h, hkv, d, seed):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, n, h, d), (b, n, hkv, d), (b, n, hkv, d), (b, n, h, d)]
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in shapes]


def reference_with_grads(q, k, v, do, ws, rs, causal):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = dense_reference(*leaves, ws, rs, causal)
    out.backward(do)
    return out.detach(), [t.grad for t in leaves]


def _sub_context(case):
    """Optional: split the world into context groups of case['context'] ranks (a mesh-like setup)."""
    import torch.distributed as dist

    size = case.get("context")
    world, rank = dist.get_world_size(), dist.get_rank()
    if not size or size == world:
        return None, world, rank, 0
    key = ("ctx", size)
    if key not in _GROUPS:
        groups = [dist.new_group(list(range(s, s + size))) for s in range(0, world, size)]
        _GROUPS[key] = groups
    return _GROUPS[key][rank // size], size, rank % size, rank // size


_GROUPS: dict = {}


def run_case(case: dict) -> dict:
    group, world, rank, which = _sub_context(case)
    b, l, h, hkv, d = case["b"], case["l"], case["h"], case["hkv"], case["d"]
    n = l * world
    ws, rs, causal = case["ws"], case["rs"], case["causal"]
    dtype = case.get("dtype", torch.float32)
    q, k, v, do = problem(b, n, h, hkv, d, case.get("seed", 0) + which)
    ref_out, ref_grads = reference_with_grads(q, k, v, do, ws, rs, causal)
    rows = slice(rank * l, (rank + 1) * l)
    ql, kl, vl = (t[:, rows].to(dtype).clone().requires_grad_() for t in (q, k, v))
    for c in dilated_comms(group):
        c.stats.reset()
    kernels.reset_calls()
    out = dilated_attention(ql, kl, vl, segment_lengths=ws, dilation_rates=rs, causal=causal, group=group)
    fwd = sum(c.stats.bytes("fwd") for c in dilated_comms(group))
    fwd_calls = sum(c.stats.calls("fwd") for c in dilated_comms(group))
    out.backward(do[:, rows].to(dtype))
    comms = dilated_comms(group)
    return {
        "err_out": (out.double() - ref_out[:, rows]).abs().max().item(),
        "err_grad": max((t.grad.double() - g[:, rows]).abs().max().item()
                        for t, g in zip((ql, kl, vl), ref_grads)),
        "fwd_bytes": fwd, "fwd_calls": fwd_calls,
        "bwd_bytes": sum(c.stats.bytes("bwd") for c in comms),
        "bwd_calls": sum(c.stats.calls("bwd") for c in comms),
        "world": world, "n": n,  # of the context group the counters belong to
        "dtypes": [str(t.dtype) for t in (out, ql.grad, kl.grad, vl.grad)],
        "backends": report(),
    }


def run_cases(cases: list[dict]) -> list[dict]:
    return [run_case(c) for c in cases]

"""Rank-side code for the tree-decoding tests (module level so the harness can pickle it)."""

from __future__ import annotations

import torch

from longctx import kernels
from longctx.parallel.comm import Comm
from longctx.parallel.sequence.tree import (
    ShardedKVCache,
    ring_decode,
    ring_decode_comm_model,
    tree_comm_model,
    tree_decode,
)
from tests.support import oracle
from tests.support.backends import report


def problem(b, t, sq, h, hkv, d, seed, dv=None):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(b, t, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, t, hkv, d if dv is None else dv, generator=g, dtype=torch.float64)
    q = torch.randn(b, sq, h, d, generator=g, dtype=torch.float64)
    return q, k, v


def _fill(cache, k, v, chunks):
    """Prefill the first chunk, append the rest in the given sizes (exercises every append offset)."""
    cache.prefill(k[:, :chunks[0]], v[:, :chunks[0]])
    at = chunks[0]
    for n in chunks[1:]:
        cache.append(k[:, at:at + n], v[:, at:at + n])
        at += n


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def run_case(case: dict) -> dict:
    comm = Comm.get(None)
    w, rank = comm.world, comm.rank
    b, t, sq, h, hkv, d = (case[x] for x in ("b", "t", "sq", "h", "hkv", "d"))
    dtype = case.get("dtype", torch.float32)
    dv = case.get("dv", d)  # values of another width (latent attention)
    q, k, v = problem(b, t, sq, h, hkv, d, case.get("seed", 0), dv)
    cache = ShardedKVCache()
    chunks = case.get("chunks", [t])
    _fill(cache, k.to(dtype), v.to(dtype), chunks)
    pos = cache.global_positions()
    res = {"positions_ok": pos.tolist() == list(range(rank, t, w))
           and torch.equal(cache.k.double(), k.to(dtype).double()[:, pos])
           and cache.shard_lengths() == [len(range(r, t, w)) for r in range(w)]}
    causal_new = case.get("causal_new", False)
    # the independent oracle; causal new tokens: bottom-right causal, they are the last sq of the sequence
    ref_out, ref_lse = oracle.attention(q, k, v, **({"right": 0} if causal_new else {}))
    qd = q.to(dtype)
    coll = case.get("collectives", 2)
    comm.stats.reset()
    kernels.reset_calls()
    out, lse = cache.decode(qd, strategy="tree", causal_new=causal_new, collectives=coll, return_lse=True)
    res["tree_bytes"], res["tree_calls"] = comm.stats.bytes("decode"), comm.stats.calls("decode")
    res["tree_model"] = tree_comm_model(w, b, sq, h, dv, qd.element_size(), collectives=coll)  # partials: dv wide
    res["tree_err"] = _err(out, ref_out)
    fin = torch.isfinite(ref_lse)
    res["lse_err"] = _err(lse[fin], ref_lse[fin])
    res["lse_inf_ok"] = bool(torch.isneginf(lse[~fin]).all())
    res["out_dtype"] = str(out.dtype)
    res["backends"] = report()
    if not causal_new:
        comm.stats.reset()
        out_r = cache.decode(qd, strategy="ring")
        res["ring_bytes"], res["ring_calls"] = comm.stats.bytes("decode"), comm.stats.calls("decode")
        res["ring_model"] = ring_decode_comm_model(w, b, max(cache.shard_lengths()), hkv, d, qd.element_size(),
                                                   v_head_dim=dv)
        res["ring_err"] = _err(out_r, ref_out)
        # without shard_lens the lengths are gathered first, under their own phase
        comm.stats.reset()
        res["ring_err_auto"] = _err(ring_decode(qd, cache.k, cache.v), ref_out)
        res["ring_auto_bytes"] = comm.stats.bytes("decode")
    return res


def ragged_case(case: dict) -> dict:
    """tree_decode with per-row valid lengths on each rank's (padded) shard."""
    comm = Comm.get(None)
    w, rank = comm.world, comm.rank
    b, s, sq, h, hkv, d = (case[x] for x in ("b", "s", "sq", "h", "hkv", "d"))
    q, k, v = problem(b, s * w, sq, h, hkv, d, case.get("seed", 1))
    g = torch.Generator().manual_seed(99)
    lengths = torch.randint(0, s + 1, (w, b), generator=g)
    lengths[:, 0] = 0  # batch row 0 is empty on every rank: out 0, lse -inf
    shard = slice(rank * s, (rank + 1) * s)
    out, lse = tree_decode(q.float(), k[:, shard].float(), v[:, shard].float(), lengths=lengths[rank],
                           return_lse=True)
    errs = []
    for bi in range(b):
        keep = torch.cat([torch.arange(r * s, r * s + int(lengths[r, bi])) for r in range(w)])
        if keep.numel() == 0:
            errs.append(_err(out[bi], torch.zeros_like(out[bi])) + float(not torch.isneginf(lse[bi]).all()))
            continue
        ro, _ = oracle.attention(q[bi:bi + 1], k[bi:bi + 1, keep], v[bi:bi + 1, keep])
        errs.append(_err(out[bi:bi + 1], ro))
    return {"err": max(errs)}


def empty_case(case: dict) -> dict:
    """Every shard empty: out 0 and lse -inf, no NaN, from both strategies."""
    b, sq, h, hkv, d = 2, 1, 4, 2, 8
    q = torch.randn(b, sq, h, d)
    k = torch.zeros(b, 0, hkv, d)
    out, lse = tree_decode(q, k, k, return_lse=True)
    out_r = ring_decode(q, k, k)
    return {"ok": bool((out == 0).all() and torch.isneginf(lse).all() and (out_r == 0).all())}


def run_cases(cases: list[dict]) -> list[dict]:
    fns = {"decode": run_case, "ragged": ragged_case, "empty": empty_case}
    return [fns[c.get("kind", "decode")](c) for c in cases]


def expect_decode_errors(calls: list[dict]) -> list[tuple[str, str]]:
    """Run bad tree_decode / ring_decode calls on every rank (the same bad input everywhere, so each rank
    refuses before any collective); return each call's (type, message) for the parent to assert on.

    Each rank holds S=4 cache slots of a striped 4*W-token cache, batch 2, Sq=2 new tokens. In a call,
    k_positions="own" stands for this rank's true positions and group="self" for a one-rank subgroup."""
    comm = Comm.get(None)
    w, rank = comm.world, comm.rank
    q, k, v = (t.float() for t in problem(2, 4 * w, 2, 4, 2, 8, seed=0))
    own = torch.arange(rank, 4 * w, w)
    k, v = k[:, own], v[:, own]
    self_group, _ = torch.distributed.new_subgroups(group_size=1)  # collective: every rank makes them
    out = []
    for call in calls:
        kw = dict(call)
        fn = {"tree": tree_decode, "ring": ring_decode}[kw.pop("fn")]
        if kw.get("k_positions") == "own":
            kw["k_positions"] = own
        if kw.get("group") == "self":
            kw["group"] = self_group
        try:
            fn(q, k, v, **kw)
            out.append(("no error", ""))
        except (ValueError, TypeError, RuntimeError) as e:
            out.append((type(e).__name__, str(e)))
    # the group still works afterwards: no rank was left inside a collective
    out.append(("after", str(comm.all_reduce(torch.ones(1), phase="check").item())))
    return out

"""Rank-side code for test_hand_bytes: run one attention call (or one decode step) and read the Comm
counters. Values are random: exactness is tested elsewhere, here only what went on the wire matters."""

from __future__ import annotations

import torch

from longctx.parallel import Comm, attention, context_mesh
from longctx.parallel.sequence.mesh import hybrid_groups
from longctx.parallel.sequence.tree import ShardedKVCache

_MESHES: dict = {}
LAYOUT = {"ring": "contiguous", "zigzag": "zigzag", "striped": "striped", "allgather": "zigzag",
          "ulysses": "contiguous", "hybrid": "zigzag"}


def _counters(comms, phases) -> dict:
    return {f"{ph}_{what}": sum(getattr(c.stats, what)(ph) for c in comms)
            for ph in phases for what in ("bytes", "calls")}


def attention_case(case: dict) -> dict:
    b, n, h, hkv, d, dtype = (case[x] for x in ("b", "n", "h", "hkv", "d", "dtype"))
    s = case["strategy"]
    group, comms = None, [Comm.get(None)]
    if s == "hybrid":
        key = tuple(case["mesh"])
        if key not in _MESHES:
            _MESHES[key] = context_mesh(*key)
        group = _MESHES[key]
        ug, rg, _ = hybrid_groups(group)
        comms = list({id(c): c for c in (Comm.get(ug), Comm.get(rg))}.values())
    c = n // comms[0].world if s != "hybrid" else n // (case["mesh"][0] * case["mesh"][1])
    g = torch.Generator().manual_seed(comms[0].rank)
    q, do = (torch.randn(b, c, h, d, generator=g).to(dtype) for _ in range(2))
    k, v = (torch.randn(b, c, hkv, d, generator=g).to(dtype).requires_grad_() for _ in range(2))
    q.requires_grad_()
    for cm in comms:
        cm.stats.reset()
    out = attention(q, k, v, causal=case.get("causal", True), strategy=s, group=group, layout=LAYOUT[s])
    out.backward(do)
    return _counters(comms, ("fwd", "bwd"))


def decode_case(case: dict) -> dict:
    """One tree_decode (each `collectives`) and one ring_decode over a round-robin cache of t tokens."""
    b, t, sq, h, hkv, d, dtype = (case[x] for x in ("b", "t", "sq", "h", "hkv", "d", "dtype"))
    comm = Comm.get(None)
    g = torch.Generator().manual_seed(0)  # the same prompt and queries on every rank
    k, v = (torch.randn(b, t, hkv, d, generator=g).to(dtype) for _ in range(2))
    q = torch.randn(b, sq, h, d, generator=g).to(dtype)
    cache = ShardedKVCache()
    cache.prefill(k, v)
    res = {}
    for coll in (1, 2):
        comm.stats.reset()
        cache.decode(q, strategy="tree", collectives=coll)
        res[f"tree{coll}"] = _counters([comm], ("decode",))
    comm.stats.reset()
    cache.decode(q, strategy="ring")
    res["ring"] = _counters([comm], ("decode",))
    return res


def run_cases(cases: list[dict]) -> list[dict]:
    return [decode_case(c) if c.get("kind") == "decode" else attention_case(c) for c in cases]

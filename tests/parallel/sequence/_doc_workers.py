"""Rank side of the packed-document tests: per-document oracle, sharded run, counted work."""

from __future__ import annotations

import torch

from longctx import kernels
from longctx.parallel import Comm, Documents, attention, context_mesh, positions, strategy_layout
from longctx.parallel.sequence.hybrid import hybrid_positions
from longctx.parallel.sequence.mesh import hybrid_groups
from tests.support import counting, oracle

from ._workers import problem


def doc_ids(lengths_per_row) -> torch.Tensor:
    """(B, N) document ids from per-row document lengths (ids count up from 0 along each row)."""
    rows = [torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths_per_row]
    return torch.stack(rows)


def per_document_reference(q, k, v, do, lengths_per_row, causal, window):
    """Each document of each row attended on its own (fp64 oracle), outputs and grads concatenated back."""
    outs, grads = torch.zeros_like(q), [torch.zeros_like(t) for t in (q, k, v)]
    for b, lengths in enumerate(lengths_per_row):
        start = 0
        for n_doc in lengths:
            sl = slice(start, start + n_doc)
            o, _, g = oracle.attention(q[b:b + 1, sl], k[b:b + 1, sl], v[b:b + 1, sl], do=do[b:b + 1, sl],
                                       **oracle.flags(causal, window))
            outs[b, sl] = o[0]
            for acc, gi in zip(grads, g):
                acc[b, sl] = gi[0]
            start += n_doc
    return outs, grads


def _setup(case, n, world, rank):
    if case["strategy"] == "hybrid":
        ring, uly = case["mesh"]
        mesh = context_mesh(ring, uly)
        ug, rg, _ = hybrid_groups(mesh)
        uc, rc = Comm.get(ug), Comm.get(rg)
        layout = strategy_layout("hybrid", case.get("layout"))
        return mesh, ([uc] if uc is rc else [uc, rc]), hybrid_positions(layout, n, rc.world, uc.world, rc.rank,
                                                                       uc.rank)
    layout = strategy_layout(case["strategy"], case.get("layout"))
    return None, [Comm.get(None)], positions(layout, n, world, rank)


def run_case(case: dict) -> dict:
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    lengths = case["lengths"]
    b, n, h, hkv, d = len(lengths), sum(lengths[0]), case["h"], case["hkv"], 8
    q, k, v, do = problem(b, n, h, hkv, d, torch.float32, case.get("seed", 0))
    ref_out, ref_grads = per_document_reference(q, k, v, do, lengths, case["causal"], case.get("window"))
    group, comms, pos = _setup(case, n, world, rank)
    for c in comms:
        c.stats.reset()
    counting.install()
    counting.counted.clear()
    kernels.reset_calls()
    ql, kl, vl, dol = [t[:, pos].float().requires_grad_(i < 3) for i, t in enumerate((q, k, v, do))]
    docs = Documents.from_ids(doc_ids(lengths))
    out = attention(ql, kl, vl, causal=case["causal"], strategy=case["strategy"], group=group, kernel="counting",
                    window=case.get("window"), layout=case.get("layout"), position_ids=pos, documents=docs)
    out.backward(dol)
    errs = [(out.double() - ref_out[:, pos]).abs().max().item()]
    errs += [(t.grad.double() - r[:, pos]).abs().max().item() for t, r in zip((ql, kl, vl), ref_grads)]
    scale = max(ref_out.abs().max().item(), max(g.abs().max().item() for g in ref_grads))
    return {"err": max(errs), "scale": scale,
            "work": {ph: sum(p for c in comms for (phs, _), p in c.stats.work.items() if phs == ph)
                     for ph in ("fwd", "bwd")},
            "steps": [(ph, st, p) for c in comms for (ph, st), p in sorted(c.stats.work.items())],
            "counted": dict(counting.counted)}


def run_cases(cases: list[dict]) -> list[dict]:
    return [run_case(c) for c in cases]

"""Rank-side code for the sequence-parallel tests (module level so the harness can pickle it)."""

from __future__ import annotations

import torch

from longctx import kernels
from longctx.parallel import STRATEGIES, Comm, attention, comm_model, context_mesh, positions, strategy_layout
from longctx.parallel.sequence.hybrid import hybrid_positions
from longctx.parallel.sequence.mesh import hybrid_groups
from tests.support import counting, oracle
from tests.support.backends import report

_MESHES: dict = {}


def problem(b, n, h, hkv, d, dtype, seed, dv=None):
    """q, k (d wide), v and the output gradient (dv wide, default d) in float64."""
    dv = d if dv is None else dv
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, n, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, n, hkv, dv, generator=g, dtype=torch.float64)
    do = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
    return q, k, v, do


def reference(q, k, v, do, causal, window, sinks=None, softcap=None):
    """float64 single-device attention over the full sequence, with gradients: the independent oracle."""
    out, _, grads = oracle.attention(q, k, v, do=do, sinks=sinks, softcap=softcap, **oracle.flags(causal, window))
    return out, grads


def _group_and_positions(case, n, world, rank):
    strategy = case["strategy"]
    if strategy == "hybrid":
        ring, uly = case["mesh"]
        key = (ring, uly)
        if key not in _MESHES:
            _MESHES[key] = context_mesh(ring, uly)
        mesh = _MESHES[key]
        ug, rg, _ = hybrid_groups(mesh)
        uc, rc = Comm.get(ug), Comm.get(rg)
        layout = strategy_layout("hybrid", case.get("layout"))
        comms = [uc] if uc is rc else [uc, rc]  # size-1 meshes may hand back one group twice
        return mesh, comms, hybrid_positions(layout, n, rc.world, uc.world, rc.rank, uc.rank)
    comm = Comm.get(None)
    layout = strategy_layout(strategy, case.get("layout"))
    return None, [comm], positions(layout, n, world, rank)


def run_case(case: dict) -> dict:
    import torch.distributed as dist

    world, rank = dist.get_world_size(), dist.get_rank()
    b, n, h, hkv, d = case["b"], case["n"], case["h"], case["hkv"], case["d"]
    dtype = case.get("dtype", torch.float32)
    causal, window = case["causal"], case.get("window")
    q, k, v, do = problem(b, n, h, hkv, d, dtype, case.get("seed", 0), case.get("dv"))
    # attention sinks: logits around the scores' own scale, so the sink takes a real share of each row
    sinks = 2 * torch.randn(h, generator=torch.Generator().manual_seed(7), dtype=torch.float64) \
        if case.get("sinks") else None
    softcap = case.get("softcap")
    ref_out, ref_grads = reference(q, k, v, do, causal, window, sinks, softcap)
    group, comms, pos = _group_and_positions(case, n, world, rank)
    for c in comms:
        c.stats.reset()
    if case.get("kernel") == counting.NAME:
        counting.install()
    kernels.reset_calls()
    local = [t[:, pos].to(dtype).requires_grad_(i < 3) for i, t in enumerate((q, k, v, do))]
    ql, kl, vl, dol = local
    sl = None if sinks is None else sinks.to(dtype).requires_grad_()
    out = attention(ql, kl, vl, causal=causal, strategy=case["strategy"], group=group,
                    kernel=case.get("kernel", "auto"), window=window,
                    layout=case.get("layout") if case.get("pass_layout", True) else None, position_ids=pos,
                    sinks=sl, softcap=softcap)
    fwd_bytes = sum(c.stats.bytes("fwd") for c in comms)
    fwd_calls = sum(c.stats.calls("fwd") for c in comms)
    out.backward(dol)
    res = {
        "err_out": (out.double() - ref_out[:, pos]).abs().max().item(),
        "err_dq": (ql.grad.double() - ref_grads[0][:, pos]).abs().max().item(),
        "err_dk": (kl.grad.double() - ref_grads[1][:, pos]).abs().max().item(),
        "err_dv": (vl.grad.double() - ref_grads[2][:, pos]).abs().max().item(),
        "fwd_bytes": fwd_bytes, "fwd_calls": fwd_calls,
        "bwd_bytes": sum(c.stats.bytes("bwd") for c in comms),
        "bwd_calls": sum(c.stats.calls("bwd") for c in comms),
        # each rank's sink gradient covers its own rows (or heads): summed over the ranks, the whole one
        "err_dsinks": None if sl is None else (_summed(sl.grad).double() - ref_grads[3]).abs().max().item(),
        "work": [(ph, st, p) for c in comms for (ph, st), p in sorted(c.stats.work.items())],
        "out_dtype": str(out.dtype), "grad_dtype": str(ql.grad.dtype),
        "backends": report(), "counted": dict(counting.counted),
    }
    if case.get("bf16_baseline"):
        # the single-device kernel's own bf16 error on the same problem: the bar for bf16 schedules
        full = [t.to(dtype).requires_grad_(i < 3) for i, t in enumerate((q, k, v))]
        mask = kernels.Mask.from_flags(causal, window)
        o = kernels.attention(*full, mask=mask, backend=case.get("kernel", "auto"))
        o.backward(do.to(dtype))
        res["base_out"] = (o.double() - ref_out).abs().max().item()
        res["base_grad"] = max((t.grad.double() - r).abs().max().item() for t, r in zip(full, ref_grads))
    model = comm_model(case["strategy"], world=world, batch=b, seq_len=n, heads=h, kv_heads=hkv, head_dim=d,
                       dtype_bytes=torch.tensor([], dtype=dtype).element_size(), layout=case.get("layout"),
                       ulysses=case["mesh"][1] if case["strategy"] == "hybrid" else None, v_head_dim=case.get("dv"))
    res["model"] = model
    return res


def _summed(t):
    import torch.distributed as dist

    t = t.clone()
    dist.all_reduce(t)
    return t


def run_cases(cases: list[dict]) -> list[dict]:
    return [run_case(c) for c in cases]


def expect_errors(cases: list[dict]) -> list[str]:
    """Run bad calls on the ranks; return each one's (type, message) so the parent can assert on it."""
    out = []
    for c in cases:
        try:
            run_case(c) if "strategy" in c and not c.get("raw") else _raw_call(c)
            out.append(("no error", ""))
        except (ValueError, TypeError, RuntimeError) as e:
            out.append((type(e).__name__, str(e)))
    return out


def _raw_call(c):
    b, c_local, h, hkv, d = c["b"], c["c"], c["h"], c["hkv"], c["d"]
    dev = c.get("device", "cpu")
    q = torch.randn(b, c_local, h, d, device=dev)
    k = torch.randn(b, c_local, hkv, d, device=dev)
    # the strategy's own layout unless the case states one (None included: "not said")
    layout = c["layout"] if "layout" in c else strategy_layout(c["strategy"]) if c["strategy"] in STRATEGIES else None
    attention(q, k, k.clone(), causal=c.get("causal", True), strategy=c["strategy"], layout=layout,
              position_ids=c.get("position_ids"), group=c.get("group"), window=c.get("window"))


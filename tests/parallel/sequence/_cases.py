"""Case builders and checks shared by the sequence-parallel tests (parent side)."""

from __future__ import annotations

import torch

from longctx.launch import run
from longctx.parallel import work_model
from tests.support.backends import check_ran

from ._hand_bytes import expected
from ._workers import run_cases

TOL_FP32 = 1e-5


def heads_for(world: int) -> int:
    return 2 * world if world < 4 else world


def grid(strategies, world, *, causals=(False, True), n_per_rank=8, window=None, dtype=torch.float32, **extra):
    """strategy x causal x {MHA, GQA, MQA} cases for one world size."""
    h = heads_for(world)
    cases = []
    for s in strategies:
        for causal in causals:
            for hkv in sorted({h, h // 2, 1}, reverse=True):
                cases.append(dict(strategy=s, b=2, n=n_per_rank * world, h=h, hkv=hkv, d=8, causal=causal,
                                  window=window, dtype=dtype, **extra))
    return cases


def _esize(case) -> int:
    return torch.tensor([], dtype=case.get("dtype", torch.float32)).element_size()


def launch(cases, world, timeout=300.0, env=None):
    return run(run_cases, world, args=(cases,), timeout=timeout, env=env)


def check(cases, results, world):
    """Exactness, comm bytes and calls against the hand-derived tables, the backend that ran, and work per step."""
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases, per_rank):
            label = f"W={world} rank={rank} {case}"
            errs = {k: r[k] for k in ("err_out", "err_dq", "err_dk", "err_dv")}
            if case.get("dtype", torch.float32) == torch.float32:
                assert max(errs.values()) <= TOL_FP32, (label, errs)
            else:
                assert r["err_out"] <= 2 * r["base_out"] + 1e-6, (label, errs, r["base_out"])
                assert max(r["err_dq"], r["err_dk"], r["err_dv"]) <= 2 * r["base_grad"] + 1e-6, (label, errs)
            # the counters against the formulas written out by hand (no product code), then the product's model
            hand = expected(case["strategy"], world=world, batch=case["b"], seq_len=case["n"], heads=case["h"],
                            kv_heads=case["hkv"], head_dim=case["d"], dtype_bytes=_esize(case),
                            ulysses=case["mesh"][1] if case["strategy"] == "hybrid" else None,
                            v_head_dim=case.get("dv"))
            for key in ("fwd_bytes", "fwd_calls", "bwd_bytes", "bwd_calls"):
                assert r[key] == hand[key] == r["model"][key], (label, key, r[key], hand[key], r["model"][key])
            check_ran(r["backends"], case.get("kernel", "auto"), label=label)
            assert r["out_dtype"] == r["grad_dtype"] == str(case.get("dtype", torch.float32)), label
            _check_work(case, r, world, rank, label)


def _check_work(case, r, world, rank, label):
    s = case["strategy"]
    uly = case["mesh"][1] if s == "hybrid" else None
    table = work_model(s, world=world, seq_len=case["n"], causal=case["causal"], window=case.get("window"),
                       layout=case.get("layout"), ulysses=uly)["table"]
    per_head = case["b"] * (case["h"] // (uly or (world if s == "ulysses" else 1)))
    ring_rank = rank // uly if s == "hybrid" else rank
    for phase in ("fwd", "bwd"):
        got = [p for ph, _, p in r["work"] if ph == phase]
        want = [row[0 if s == "ulysses" else ring_rank] * per_head for row in table]
        assert got == want, (label, phase, got, want)
        if case.get("kernel") == "counting":  # what the kernels were really asked to compute
            assert r["counted"][phase] == sum(got), (label, phase, r["counted"], sum(got))

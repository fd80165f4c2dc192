"""Rank-side code for the model tests (module level, so the harness can pickle it)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from longctx.config import load
from longctx.model import build_model, parallelize
from longctx.parallel import ParallelDims
from tests.support.equivalence import SMALL


def expect_errors(calls):
    """Run each (callable name, kwargs) on the ranks; return (type, message) per call."""
    out = []
    for name, kwargs in calls:
        try:
            globals()[name](**kwargs)
            out.append(("no error", ""))
        except Exception as e:  # noqa: BLE001 - the test asserts on type and message
            out.append((type(e).__name__, str(e)))
    return out


def parallelize_with(overrides, world_cp=None, forward=None):
    cfg = load(overrides=[*SMALL, *overrides])
    p = cfg.parallel
    world = dist.get_world_size()
    dims = ParallelDims(dp_shard=1, cp=world_cp or world, world_size=world, strategy=p.strategy, ulysses=p.ulysses,
                        layout=p.layout)
    model = build_model(cfg.model, seq_len=32)
    plan = parallelize(model, dims, cfg.parallel)
    if forward == "twice":
        parallelize(model, dims, cfg.parallel)
    elif forward == "no_positions":
        model(torch.zeros(1, 32 // world, dtype=torch.long))
    elif forward == "wrong_positions":
        model(torch.zeros(1, 32 // world, dtype=torch.long), torch.arange(32 // world) + 1)
    return plan


def position_checks():
    """How often the plan's model checks position ids: once for the plan's own tensor, and again whenever
    that tensor changes or a caller passes ids of its own."""
    import importlib

    par = importlib.import_module("longctx.model.parallelize")  # the module (the package exports the function)

    calls = []
    real = par.check_positions
    par.check_positions = lambda given, expected: (calls.append(1), real(given, expected))
    try:
        plan = parallelize_with([])
        tokens = torch.zeros(1, 32, dtype=torch.long)
        batch = plan.shard_batch(tokens, tokens)
        for _ in range(3):  # three steps (or micro-batches) with the plan's positions: one check
            plan.model(batch["input_ids"], plan.shard_batch(tokens)["position_ids"])
        once = len(calls)
        errors = []
        for pos in (batch["position_ids"].clone() + 1, None):
            try:
                if pos is None:  # the plan's own tensor, edited in place after it was checked
                    batch["position_ids"].add_(1)
                    pos = batch["position_ids"]
                plan.model(batch["input_ids"], pos)
            except ValueError as e:
                errors.append(str(e))
        return once, errors
    finally:
        par.check_positions = real

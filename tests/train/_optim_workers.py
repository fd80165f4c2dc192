"""Rank-side code for the optimizer test (module level, so the harness can pickle it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor


def local_adamw_steps(full_params: list, full_grads: list, steps: int) -> dict:
    """`steps` steps of longctx's AdamW over DTensor parameters on a 1-D mesh of every rank: a row-sharded
    matrix with a sharded gradient, a replicated vector whose gradient is a partial sum (this rank's share of
    `full_grads[1]`), a sharded matrix whose gradient arrives replicated, and a plain tensor. Returns the full
    parameters, whether the moments stayed DTensors laid out like their parameters, and which DTensor
    sharding strategies the steps after the first derived (the cost the local step avoids)."""
    from longctx.train.optim import LocalAdamW

    propagator = DTensor._op_dispatcher.sharding_propagator
    derived = []
    counted = propagator.propagate_op_sharding_non_cached

    def counting(*args, **kwargs):
        derived.append(str(args[0].op))
        return counted(*args, **kwargs)

    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (world,))
    layouts = [[Shard(0)], [Replicate()], [Shard(0)], None]
    params = [torch.nn.Parameter(p.clone() if layout is None else distribute_tensor(p.clone(), mesh, layout))
              for p, layout in zip(full_params, layouts)]
    opt = LocalAdamW([{"params": params[:1] + params[2:], "weight_decay": 0.1},
                      {"params": params[1:2], "weight_decay": 0.0}], lr=0.01, foreach=True)
    for step in range(steps):
        grads = [g * (step + 1) for g in full_grads]
        params[0].grad = distribute_tensor(grads[0], mesh, [Shard(0)])
        # each rank holds a different addend: the sum of the addends is the gradient
        share = grads[1] * (rank + 1) * 2 / (world * (world + 1))
        params[1].grad = DTensor.from_local(share, mesh, [Partial()], run_check=False)
        params[2].grad = distribute_tensor(grads[2], mesh, [Replicate()])
        params[3].grad = grads[3]
        if step:  # (the first step creates the moments: zeros_like of each parameter)
            propagator.propagate_op_sharding_non_cached = counting
        try:
            opt.step()
        finally:
            propagator.propagate_op_sharding_non_cached = counted
        opt.zero_grad(set_to_none=True)
    moments_kept = all(isinstance(s["exp_avg"], DTensor) and s["exp_avg"].placements == p.placements
                       for p in params[:3] for s in [opt.state[p]])
    full = [p.full_tensor() if isinstance(p, DTensor) else p.detach().clone() for p in params]
    return {"params": full, "moments_kept": moments_kept, "strategies_derived": derived}

"""AdamW; a learning rate of warmup then cosine, linear or constant (an optional stable phase before the
decay); gradient clipping by the global norm.

Clipping must see the norm of the whole gradient, not of this rank's shard: under FSDP2 a gradient is a
DTensor sharded over the data x context ranks (and under tensor parallelism over the tp ranks), and its norm
is a partial value until reduced. Each rank sums the squares of its local pieces, one all-reduce per mesh
dimension that shards them adds up the pieces (a replicated dimension is not summed: its copies are one
piece), and every rank then scales its pieces by the same factor.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear and embedding weights), not vectors (norm weights)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:  # a ZeRO-3 partition built in pieces is flat: its ds_shape is the parameter's
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class LocalAdamW(torch.optim.AdamW):
    """torch's AdamW, stepping a DTensor parameter (FSDP2, tensor parallel) through its local piece.

    AdamW is elementwise, so each rank updating its own piece of the parameter, gradient and moments is the
    arithmetic DTensor's foreach ops do. But DTensor re-derives a sharding strategy for every tensor of every
    foreach op at every step (the bias corrections are new floats each step, so its cache never hits): about
    half of a small model's step on CPU, and milliseconds per step of host time on a GPU. The state stays
    DTensors (the checkpoint's sharded optimizer state); only the step's arithmetic sees the local tensors."""

    def _init_group(self, group, params, grads, *state_lists):
        has_complex = super()._init_group(group, params, grads, *state_lists)
        from torch.distributed.tensor import DTensor

        for index, (param, grad) in enumerate(zip(params, grads)):
            if isinstance(grad, DTensor) and tuple(grad.placements) != tuple(param.placements):
                # a partial sum (or another layout) is made the parameter's layout first, as DTensor's op would
                grads[index] = grad.redistribute(param.device_mesh, param.placements)
        for tensors in (params, grads, *state_lists):
            tensors[:] = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
        return has_complex


def build_optimizer(model: nn.Module, cfg, device_type: str) -> torch.optim.Optimizer:
    """AdamW; the fused kernel on GPU, the multi-tensor (foreach) one on CPU."""
    kw = {"fused": True} if device_type == "cuda" else {"foreach": True}
    return LocalAdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                      eps=cfg.eps, **kw)


LR_SCHEDULES = ("cosine", "linear", "constant")


def lr_factor(step: int, *, warmup: int, total: int, min_ratio: float, schedule: str = "cosine",
              decay: int = 0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warmup over `warmup` steps (the first
    step already moves, the last is at the peak), then the peak until the decay, which takes the last `decay` steps
    (0: every step after the warmup but the first, which holds the peak) down to min_ratio at the last step, along
    a cosine or a line; `constant` stays at the peak. A stable phase between warmup and decay is
    warmup-stable-decay (WSD), as used for context extension. A run no longer than its warmup ends inside it."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = decay or total - warmup - 1  # steps below the peak, the last at min_ratio
    if span <= 0:  # one step after the warmup's peak: the last, at the floor (a one-step run: at the peak)
        return min_ratio if warmup else 1.0
    progress = min(1.0, max(0.0, (step - (total - 1 - span)) / span))
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, warmup=cfg.warmup_steps, total=cfg.steps, min_ratio=cfg.min_lr_ratio,
                         schedule=cfg.lr_schedule, decay=cfg.decay_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def apply_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, cfg) -> None:
    """This run's AdamW settings and LR schedule on an optimizer and scheduler restored from a checkpoint, which
    bring the settings of the run that saved them: a resume with a lower train.lr (after a divergence), other
    betas or more train.steps takes them from its next step (the schedule evaluated at the restored step under
    this run's warmup, length and floor). Unchanged settings give the saved values bit for bit."""
    for index, group in enumerate(optimizer.param_groups):  # param_groups(): the decayed matrices first
        group["betas"], group["eps"] = (cfg.beta1, cfg.beta2), cfg.eps
        group["weight_decay"] = cfg.weight_decay if index == 0 else 0.0
        group["initial_lr"] = cfg.lr
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    scheduler._last_lr = lrs  # what get_last_lr() and the step record read
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr  # the optimizer's own state restored the saved lr; a resharded DeepSpeed load none


def clip_grad_norm(parameters, max_norm: float, pp_group=None, uncounted=None) -> torch.Tensor:
    """Global gradient norm (over every shard and rank; with `pp_group`, over every pipeline stage too);
    grads scaled to max_norm when above it and max_norm > 0. Returns the norm before clipping. `uncounted`:
    a parameter clipped but left out of the norm (a second copy of a tied weight, counted once already)."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    params = [p for p in parameters if p.grad is not None]
    with torch.no_grad():
        squares = _sum_of_squares([p.grad for p in params if p is not uncounted])
        if pp_group is not None:  # each stage holds different parameters: sum the squares over the stages
            dist.all_reduce(squares, group=pp_group)
        total = squares.sqrt().float()
        if params and max_norm > 0:
            # the same factor as torch's clip_grads_with_norm_, applied to this rank's pieces
            scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
            by_kind: dict = {}
            for p in params:
                local = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
                by_kind.setdefault((local.device, local.dtype), []).append(local)
            for (device, dtype), grads in by_kind.items():
                torch._foreach_mul_(grads, scale.to(device, dtype))
    return total


def _sum_of_squares(grads: list) -> torch.Tensor:
    """The squared 2-norm of the whole gradient (float64, the same on every rank of a stage). Each rank sums the
    squares of its own pieces, which is then summed over the mesh dimensions that shard them (a replicated
    piece is counted once). Computed on the local tensors: DTensor's foreach norm re-derives a sharding
    strategy for every tensor at every step, most of a step's CPU time on a 3-D mesh of small ranks."""
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    device = grads[0].device if grads else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    pieces: dict = {}  # (mesh, sharded mesh dims) -> local tensors
    partial = []  # a piece that is a partial sum has no norm of its own: made whole by DTensor
    for grad in grads:
        if not isinstance(grad, DTensor):
            pieces.setdefault((None, ()), []).append(grad)
        elif any(placement.is_partial() for placement in grad.placements):
            partial.append(grad)
        else:
            mesh = grad.device_mesh
            # every placement but Replicate splits the tensor (Shard, and FSDP2's _StridedShard under tp, whose
            # is_shard() is False)
            dims = tuple(d for d, placement in enumerate(grad.placements)
                         if not placement.is_replicate() and mesh.size(d) > 1)
            pieces.setdefault((mesh, dims), []).append(grad.to_local())
    for (mesh, dims), local in pieces.items():  # the same order on every rank of a stage: its parameters' order
        squares = torch.stack(torch._foreach_norm(local, 2, dtype=torch.float32)).double().square().sum()
        for dim in dims:
            dist.all_reduce(squares, group=mesh.get_group(dim))
        total = total + squares.to(device)
    if partial:
        whole = torch.nn.utils.get_total_norm(partial, norm_type=2.0, foreach=True).full_tensor()
        total = total + whole.double().square().to(device)
    return total

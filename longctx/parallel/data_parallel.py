"""Data parallelism over the mesh: FSDP2, DDP, or both (HSDP), with the field's own implementations.

Context ranks hold different tokens of the same sequences, so their gradients must be summed exactly as
data ranks' are: every engine here reduces over data x context ranks.

  engine  mesh                           what it is
  fsdp    fsdp = dp_shard x cp           fully_shard per block, then the root (FSDP2)
  hsdp    (dp_replicate, dp_shard x cp)  FSDP2 on a 2-D mesh: shard inside, replicate across
  ddp     ddp = dp_replicate x cp        torch's DDP (the composable `replicate`, which keeps parameter names)
  none    -                              one rank per sequence and no data parallel: nothing to reduce

Both reduce by averaging over their group; the trainer scales the loss by the group size (dp x cp) so that
the average becomes the sum a globally normalised loss needs (docs/algorithms.md §11).
"""

from __future__ import annotations

import torch
from torch import nn

from .dims import ParallelDims, ParallelMesh

ENGINES = ("auto", "torch", "fsdp", "ddp", "deepspeed")  # torch = auto: FSDP2 for dp_shard, DDP for dp_replicate


def resolve_engine(engine: str, dims: ParallelDims) -> str:
    """The engine a config asks for, made concrete: none | ddp | fsdp | hsdp | deepspeed."""
    if engine not in ENGINES:
        raise ValueError(f"parallel.engine={engine!r} is not one of {', '.join(ENGINES)}")
    if engine == "deepspeed":
        return "deepspeed"  # its own checks: longctx.parallel.deepspeed_engine.check_deepspeed
    split = dims.tp > 1 or dims.pp > 1
    if split and engine == "ddp":
        # tensor-parallel parameters are DTensors, and pipeline schedules run several forwards before their
        # backwards: FSDP2 composes with both, torch's DDP with neither (refused with no data ranks too: the
        # same config would fail as soon as it had some)
        axes = " and ".join(f"parallel.{a}={getattr(dims, a)}" for a in ("tp", "pp") if getattr(dims, a) > 1)
        raise ValueError(f"{axes} needs FSDP2 for data/context parallelism (DDP does not compose with it): set "
                         f"parallel.engine=fsdp (or auto); with parallel.dp_replicate > 1 that is HSDP")
    if dims.dp_cp == 1:
        return "none"
    if split:
        # replicas of a tp/pp model: FSDP2 on the 2-D (dp_replicate, dp_shard x cp) mesh, whose shard
        # dimension may have size 1 (plain replication, reduced by FSDP2's all-reduce)
        return "hsdp" if dims.dp_replicate > 1 else "fsdp"
    if engine in ("auto", "torch"):
        engine = "fsdp" if dims.dp_shard > 1 else "ddp"
    if engine == "ddp":
        if dims.dp_shard > 1:
            raise ValueError(f"parallel.engine=ddp replicates parameters, so it cannot shard them over "
                             f"parallel.dp_shard={dims.dp_shard}; use parallel.engine=fsdp (or auto), or move those "
                             f"ranks to parallel.dp_replicate")
        return "ddp"
    if dims.dp_shard * dims.cp == 1:
        # FSDP2 over a shard dimension of 1 only replicates: saying so beats running DDP in its name (whose
        # bf16 is autocast, not FSDP2's bf16 weight copies)
        raise ValueError(f"parallel.engine=fsdp shards over parallel.dp_shard x cp, which is 1 here, so it would "
                         f"only replicate over parallel.dp_replicate={dims.dp_replicate}: move those ranks to "
                         f"parallel.dp_shard={dims.dp_replicate} to shard, or set parallel.engine=ddp (or auto)")
    return "hsdp" if dims.dp_replicate > 1 else "fsdp"


def apply_fsdp(model: nn.Module, mesh, *, reshard_after_forward: bool = True, param_dtype=None,
               reduce_dtype=torch.float32, keep_root_unsharded: bool = False) -> None:
    """fully_shard each transformer block, then the root (so the embedding and output share one unit).
    keep_root_unsharded: the root's parameters stay gathered after forward (a pipeline's last stage, whose
    loss uses the output weight after the stage's forward has returned)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype) if param_dtype else None
    kw = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp is not None:
        kw["mp_policy"] = mp
    for block in (model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers):
        if next(block.parameters(), None) is not None:  # a pipeline stage's stand-in for another's layer has none
            fully_shard(block, **kw)
    fully_shard(model, **{**kw, "reshard_after_forward": reshard_after_forward and not keep_root_unsharded})


def apply_ddp(model: nn.Module, mesh, find_unused: bool = False) -> None:
    """`find_unused`: the model may hold trainable parameters a step gives no gradient (an MoE router's
    correction bias, experts no token of this rank reached). DDP's reducer waits for every parameter's
    gradient before it all-reduces a bucket; one that never comes leaves its bucket, and so every gradient
    in it, unreduced (each rank keeps its own: seen as 100% gradient error on HF MoE models, silently), so
    the autograd graph is searched for them each step instead."""
    from torch.distributed._composable.replicate import replicate

    replicate(model, device_mesh=mesh, find_unused_parameters=find_unused)


def apply_data_parallel(model: nn.Module, mesh: ParallelMesh, engine: str, *, reshard_after_forward: bool = True,
                        param_dtype=None, keep_root_unsharded: bool = False, find_unused: bool = False) -> str:
    """Wrap `model` for the resolved engine; returns it. `find_unused`: see apply_ddp (FSDP2 needs nothing:
    it reduces each parameter's gradient as it comes, a missing one as none)."""
    engine = resolve_engine(engine, mesh.dims) if engine in ENGINES else engine
    if engine in ("fsdp", "hsdp"):
        apply_fsdp(model, mesh.fsdp if engine == "fsdp" else mesh.hsdp, reshard_after_forward=reshard_after_forward,
                   param_dtype=param_dtype, keep_root_unsharded=keep_root_unsharded)
    elif engine == "ddp":
        apply_ddp(model, mesh.ddp, find_unused)
    return engine


def set_gradient_sync(model: nn.Module, engine: str, enabled: bool) -> None:
    """Skip (False) or do (True) the gradient reduction of the next backward: accumulation micro-batches
    reduce once, on the last one."""
    if engine not in ("none", "deepspeed"):  # DeepSpeed knows its accumulation boundary from its own config
        model.set_requires_gradient_sync(enabled)

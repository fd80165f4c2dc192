"""What one micro-batch costs on this rank, measured on a built Trainer (for `longctx bench train` and the
tests): the bytes autograd saves for backward, and the bytes sent on each mesh axis. Both run a forward and
backward of the current step's first micro-batch and drop the gradients, so training is unchanged."""

from __future__ import annotations

import torch.distributed as dist

from .metrics import SavedTensorCounter


def saved_activation_bytes(trainer) -> int:
    """Bytes of tensors saved for backward by one micro-batch's forward on this rank (parameters
    excluded), counted with saved_tensors_hooks; the backward then runs and the gradients are dropped.
    Under a pipeline the count covers the schedule's whole step: every pipeline microbatch's stages."""
    shard = trainer.micro_batches(trainer.step)[0]
    if trainer.pipeline is not None:
        with SavedTensorCounter(trainer.model) as counter:
            trainer._pipeline_pass(shard, 1.0)
    else:
        with SavedTensorCounter(trainer.model) as counter:
            part = trainer._loss(shard)
        if trainer.engine is not None:
            trainer.engine.backward(part, scale_wrt_gas=False)
        else:
            part.backward()
    if trainer.engine is not None:
        trainer.engine.zero_grad()
    trainer.optimizer.zero_grad(set_to_none=True)
    return counter.bytes


def axis_bytes(trainer) -> dict:
    """Bytes this rank sent per mesh axis in one micro-batch's forward and backward, counted at every
    collective torch issues (CollectiveCounter): tp, cp (attention), dp (the data x context gradient and
    parameter traffic of FSDP2/DDP) and pp (stage sends). When the data-parallel reduction runs on the cp
    ranks' own group (no data ranks), the attention's share of that group is what its Comm counted, and
    the rest is dp. Gradients are dropped afterwards. Not with DeepSpeed (its engine owns the reduction)."""
    from ..parallel.collectives import CollectiveCounter
    from ..parallel.comm import Comm

    if trainer.engine is not None:
        raise ValueError("axis_bytes is not available with parallel.engine=deepspeed (DeepSpeed owns the "
                         "gradient reduction); use parallel.engine=torch to count bytes per axis")
    mesh = trainer.plan.mesh
    cp_meshes = [mesh.cp_hybrid[d] for d in ("ring", "ulysses")] if mesh.cp_hybrid is not None else [mesh.cp]
    cp_comms = [Comm.get(m) for m in cp_meshes if m.size() > 1]
    before = sum(c.stats.bytes() for c in cp_comms)
    shard = trainer.micro_batches(trainer.step)[0]
    with CollectiveCounter() as counter:
        if trainer.pipeline is not None:
            trainer._pipeline_pass(shard, 1.0)
        else:
            trainer._loss(shard).backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    cp = sum(c.stats.bytes() for c in cp_comms) - before
    cp_names = {m.get_group().group_name for m in cp_meshes if m.size() > 1}
    dp_mesh = {"fsdp": mesh.fsdp, "ddp": mesh.ddp}.get(trainer.plan.engine)
    dp = counter.on(dp_mesh)
    if trainer.plan.engine == "hsdp":  # sharded inside, replicated across: both dimensions are data traffic
        dp = counter.on(mesh.hsdp["dp_replicate"]) + counter.on(mesh.hsdp["dp_shard_cp"])
    shared = dp_mesh is not None and dp_mesh.size() > 1 and dp_mesh.get_group().group_name in cp_names
    if shared:
        dp -= cp
    # tp's ranks are no other axis's (every other mesh leaves tp out), so its bytes are those of its rank set
    tp = counter.on_ranks(dist.get_process_group_ranks(mesh.tp.get_group())) if mesh.tp.size() > 1 else 0
    return {"tp": tp, "cp": cp, "dp": dp,
            "pp": counter.on(mesh.world["pp"]),
            # a cross-check: what the dispatcher saw on the cp groups (attention, plus dp when it shares them)
            "on_cp_groups": sum(counter.bytes.get(n, 0) for n in cp_names), "dp_on_cp_group": shared}

"""Rank-side code for the ParallelDims tests."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d

from longctx.parallel import ParallelDims


def mesh_groups(dim_sets: list[dict]) -> list[dict]:
    """Build the mesh of each ParallelDims and report the global ranks of every group this rank is in."""
    out = []
    for kwargs in dim_sets:
        dims = ParallelDims(world_size=dist.get_world_size(), **kwargs)
        mesh = dims.build_mesh("cpu")
        groups = {}
        for name in ("cp", "dp_cp", "dp", "fsdp", "ddp", "tp"):
            m = mesh.world[name] if name == "cp" else getattr(mesh, name)
            groups[name] = dist.get_process_group_ranks(m.get_group())
        if mesh.hsdp is not None:
            for name in ("dp_replicate", "dp_shard_cp"):
                groups[f"hsdp.{name}"] = dist.get_process_group_ranks(mesh.hsdp.get_group(name))
            # FSDP2 refuses a DTensor parameter whose mesh has another root than its own
            groups["tp_shares_hsdp_root"] = mesh.tp._get_root_mesh() is mesh.hsdp._get_root_mesh()
        if mesh.cp_hybrid is not None:
            for name in ("ring", "ulysses"):
                groups[f"hybrid.{name}"] = dist.get_process_group_ranks(mesh.cp_hybrid.get_group(name))
        groups["none_when_one"] = [mesh.group(n) is None for n in ("dp_cp", "cp", "dp")]
        groups["timeouts_s"] = sorted({_timeout_s(g) for g in c10d._world.pg_map})
        out.append(groups)
    return out


def _timeout_s(group) -> float:
    """A group's collective timeout as its gloo backend holds it."""
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def late_on_a_subgroup(late_s: float) -> str:
    """cp=2 x dp_shard=2 on 4 ranks: rank 3 joins its cp group's all-reduce `late_s` seconds after its peer."""
    import time

    mesh = ParallelDims(world_size=4, dp_shard=2, cp=2).build_mesh("cpu")
    if dist.get_rank() == 3:
        time.sleep(late_s)
    dist.all_reduce(torch.ones(1), group=mesh.world["cp"].get_group())
    return "joined"

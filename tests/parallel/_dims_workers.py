"""Rank-side code for the ParallelDims tests."""

from __future__ import annotations

import torch.distributed as dist

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
        out.append(groups)
    return out

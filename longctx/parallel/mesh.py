"""Named device meshes for context parallelism (a 2D ring x ulysses mesh for the hybrid strategy)."""

from __future__ import annotations

import torch.distributed as dist


def context_mesh(ring: int, ulysses: int, device_type: str | None = None):
    """A DeviceMesh of shape (ring, ulysses) named ("ring", "ulysses").

    Ulysses is the inner dimension, so its all-to-alls stay between neighbouring ranks (one node), and
    the ring spans nodes, where its transfers overlap with compute.
    """
    from torch.distributed.device_mesh import init_device_mesh

    if not dist.is_initialized():
        raise RuntimeError("context_mesh needs an initialised process group (torch.distributed / longctx.launch)")
    world = dist.get_world_size()
    for name, val in (("ring", ring), ("ulysses", ulysses)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} degree must be a positive int, got {val!r}")
    if ring * ulysses != world:
        raise ValueError(
            f"world size {world} does not factor as ring {ring} x ulysses {ulysses}; choose degrees whose "
            f"product is {world}"
        )
    if device_type is None:
        device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    return init_device_mesh(device_type, (ring, ulysses), mesh_dim_names=("ring", "ulysses"))


def hybrid_groups(group):
    """(ulysses_group, ring_group) from a ("ring", "ulysses") DeviceMesh or a (ulysses, ring) pair."""
    if isinstance(group, (tuple, list)) and len(group) == 2:
        return group[0], group[1]
    names = getattr(group, "mesh_dim_names", None)
    if names is not None and "ring" in names and "ulysses" in names:
        return group.get_group("ulysses"), group.get_group("ring")
    raise ValueError(
        "strategy 'hybrid' needs group=context_mesh(ring, ulysses) (a DeviceMesh named ('ring', 'ulysses')) "
        "or a (ulysses_group, ring_group) pair"
    )

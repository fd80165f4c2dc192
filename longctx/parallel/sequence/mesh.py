"""A standalone ("ring", "ulysses") DeviceMesh for the hybrid strategy, and reading one back.

Inside a training job the mesh comes from ParallelDims (longctx.parallel.dims), whose context axis is
split into the same two named dimensions; `context_mesh` is for the bare API over the whole world.
"""

from __future__ import annotations

import torch.distributed as dist

from ..comm import group_device_type
from ..timeouts import match_world_timeout


def context_mesh(ring: int, ulysses: int, device_type: str | None = None):
    """A DeviceMesh of shape (ring, ulysses) named ("ring", "ulysses") over the whole world.

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
    mesh = init_device_mesh(device_type or group_device_type(), (ring, ulysses), mesh_dim_names=("ring", "ulysses"))
    match_world_timeout()
    return mesh


def is_hybrid_group(group) -> bool:
    """Whether `group` names the hybrid strategy's two groups: a ("ring", "ulysses") DeviceMesh or a pair."""
    names = getattr(group, "mesh_dim_names", None)
    return (isinstance(group, (tuple, list)) and len(group) == 2) or (
        names is not None and "ring" in names and "ulysses" in names)


def hybrid_groups(group):
    """(ulysses_group, ring_group, device_type) from a ("ring", "ulysses") DeviceMesh, or from a
    (ulysses_group, ring_group) pair (device type then read from the groups' backend: None)."""
    if isinstance(group, (tuple, list)) and len(group) == 2:
        return group[0], group[1], None
    if is_hybrid_group(group):
        return group.get_group("ulysses"), group.get_group("ring"), group.device_type
    raise ValueError(
        "strategy 'hybrid' needs group=context_mesh(ring, ulysses) (a DeviceMesh named ('ring', 'ulysses')) "
        "or a (ulysses_group, ring_group) pair"
    )

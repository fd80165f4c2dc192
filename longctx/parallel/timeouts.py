"""One collective timeout for every process group of a job: the default group's (parallel.timeout_s).

torch builds a DeviceMesh's sub-groups, and any `new_group` not given a timeout, with its own default (30
minutes on gloo, 10 on NCCL) instead of the default group's. A peer alive but stuck (a rank in a cp ring, a
tp exchange, a pipeline send) then held the others that long, whatever timeout_s said. Whatever builds
groups calls `match_world_timeout()` after it, which sets them all (idempotent: a group already right is
set again to the same value).
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed import distributed_c10d as c10d


def world_timeout():
    """The default group's collective timeout (a timedelta), or None when it cannot be read."""
    world = dist.group.WORLD
    for device in getattr(world, "_device_types", ()):
        options = getattr(world._get_backend(device), "options", None)
        timeout = getattr(options, "_timeout", None)
        if timeout is not None:
            return timeout
    return None


def match_world_timeout() -> None:
    """Every process group this rank belongs to gets the default group's timeout."""
    if not dist.is_initialized():
        return
    timeout = world_timeout()
    if timeout is None:
        return
    world = dist.group.WORLD
    for group in list(c10d._world.pg_map):
        if group is not world and not c10d._rank_not_in_group(group):
            c10d._set_pg_timeout(timeout, group)

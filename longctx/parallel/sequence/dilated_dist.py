"""The distributed half of LongNet dilated attention: segment sub-groups and their collectives.

A pattern whose segment w spans g = w / l ranks only needs the sparsified K/V of those g ranks. Gathering
inside a sub-group per segment moves (g-1)/(W-1) of what a whole-group gather would (torchscale gathers
over the whole group and slices, docs/algorithms.md §10), and keeps the bytes per rank constant under weak
scaling (N and W doubled together).

Sub-groups: with the default group every rank creates every segment group of every g, in the same order
(torch.distributed.new_group is collective over the world). With a smaller context group (say one of
several in a device mesh) a rank cannot know the other context groups' segments, so it creates only its
own with use_local_synchronization=True (only the members call it). Groups are cached per rank set.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..comm import Comm
from ..timeouts import match_world_timeout

LOCAL = "local"  # pass as group= to run single-device inside a distributed job

_SEGMENT_COMMS: dict = {}  # (context key, g) -> Comm of this rank's segment group


def context_comm(group) -> Comm | None:
    """The sequence-parallel Comm, or None for single-device runs."""
    if group == LOCAL or (group is None and not (dist.is_available() and dist.is_initialized())):
        return None
    return Comm.get(group)


def _key(group):
    # the group object itself, so a re-initialised world does not reuse stale sub-groups
    return dist.group.WORLD if group is None else group


def segment_comm(group, comm: Comm, g: int) -> Comm:
    """The Comm of this rank's segment group of g consecutive ranks of the context group."""
    if g == comm.world:
        return comm
    key = (_key(group), g)
    if key in _SEGMENT_COMMS:
        return _SEGMENT_COMMS[key]
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(comm.world))
    mine = comm.rank // g
    spans = [ranks[s * g:(s + 1) * g] for s in range(comm.world // g)]
    whole = group is None or len(ranks) == dist.get_world_size()
    sub = None
    if whole:
        for s, members in enumerate(spans):  # every rank, every group, same order
            pg = dist.new_group(members)
            if s == mine:
                sub = pg
    else:
        sub = dist.new_group(spans[mine], use_local_synchronization=True)
    match_world_timeout()
    _SEGMENT_COMMS[key] = Comm.get(sub)
    return _SEGMENT_COMMS[key]


def dilated_comms(group=None) -> list[Comm]:
    """Every Comm dilated attention has used for this context group (its own and its segment groups), so
    callers can reset or sum their byte counters."""
    comm = context_comm(group)
    if comm is None:
        return []
    subs = [c for (k, _), c in _SEGMENT_COMMS.items() if k == _key(group) and c is not comm]
    return [comm, *subs]


def gather_sparse(packed: torch.Tensor, comm: Comm, keep: int) -> torch.Tensor:
    """All-gather this rank's packed sparse K/V (2, B, l/r, Hs, D) inside the segment group; returns the
    first `keep` ranks' parts stacked (keep, 2, B, l/r, Hs, D)."""
    parts = comm.all_gather(packed, phase="fwd")
    return torch.stack(parts[:keep])


def reduce_scatter_sparse(dbuf: torch.Tensor, comm: Comm) -> torch.Tensor:
    """dbuf (g, 2, B, l/r, Hs, D): this rank's contributions to every segment rank's sparse dK/dV; returns
    the summed gradient of this rank's own sparse K/V (2, B, l/r, Hs, D)."""
    return comm.reduce_scatter(dbuf, phase="bwd")[0]

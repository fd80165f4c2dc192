"""Bytes every collective moves, per mesh axis, counted where torch issues it (a TorchDispatchMode).

Context-parallel attention counts its own bytes in `Comm`, but tensor parallelism (DTensor redistributes),
FSDP2 (parameter all-gathers, gradient reduce-scatters) and pipelining (stage sends) move data through
torch's own collectives. `CollectiveCounter` sees every one of them as a dispatcher op, functional
(`_c10d_functional.*`, which names its group) or in-place (`c10d.*`, which carries the ProcessGroup), and
adds its bytes to the axis whose group it ran on, in comm.py's convention (what this rank puts on the
wire under the bandwidth-optimal algorithm):

  all-gather      (W-1) x the local chunk          reduce-scatter   (W-1)/W x the input
  all-reduce      2 (W-1)/W x the tensor           all-to-all       (W-1)/W x the input
  send            the tensor                       broadcast        the tensor, on the root (a recv sends nothing)
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _nbytes(ts) -> int:
    if isinstance(ts, torch.Tensor):
        return ts.numel() * ts.element_size()
    return sum(_nbytes(t) for t in ts)


def _pg(obj):
    """The ProcessGroup behind a c10d op's script-object argument."""
    unbox = getattr(torch.distributed.ProcessGroup, "unbox", None)
    return unbox(obj) if unbox is not None and not isinstance(obj, torch.distributed.ProcessGroup) else obj


class CollectiveCounter(TorchDispatchMode):
    """with CollectiveCounter() as c: ...; then c.bytes[group_name] and c.calls[group_name] per process group
    (`c.on(mesh)` for a 1-D DeviceMesh). Several axes can share one group (a data-parallel reduction over the
    context ranks runs on the cp ranks' group): attributing bytes to axes is the caller's business."""

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()
        self.ranks: dict[str, tuple[int, ...]] = {}  # group name -> its global ranks

    def on(self, mesh) -> int:
        """Bytes counted on the group of a 1-D DeviceMesh (0 for None or a single rank)."""
        if mesh is None or mesh.size() == 1:
            return 0
        return self.bytes.get(mesh.get_group().group_name, 0)

    def on_ranks(self, ranks) -> int:
        """Bytes counted on every group of exactly these global ranks. torch may run an axis's traffic on
        several groups of the same ranks (a DTensor keeps the mesh, and so the group, of an earlier,
        equal mesh it found cached), so an axis whose rank set no other axis shares is counted this way."""
        ranks = tuple(sorted(ranks))
        return sum(n for name, n in self.bytes.items() if self.ranks.get(name) == ranks)

    def _add(self, group_name: str, n: int, pg) -> None:
        self.bytes[group_name] += int(n)
        self.calls[group_name] += 1
        if group_name not in self.ranks:
            self.ranks[group_name] = tuple(sorted(torch.distributed.get_process_group_ranks(pg)))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = _RULES.get((func.namespace, func.__name__.split(".")[0]))
        if rule is not None:
            group_at, sent = rule
            if func.namespace == "_c10d_functional":  # the group comes by name
                name = args[group_at]
                pg = torch.distributed.distributed_c10d._resolve_process_group(name)
            else:  # in-place c10d ops carry the ProcessGroup itself
                pg = _pg(args[group_at])
                name = pg.group_name
            self._add(name, sent(args, pg.size(), pg), pg)
        return out


def _share(nbytes: int, w: int, factor: int = 1) -> int:
    return factor * nbytes * (w - 1) // w


# (namespace, op) -> (index of the group argument, bytes this rank sends given (args, W, ProcessGroup))
_RULES = {
    ("_c10d_functional", "all_gather_into_tensor"): (2, lambda a, w, pg: (w - 1) * _nbytes(a[0])),
    ("_c10d_functional", "reduce_scatter_tensor"): (3, lambda a, w, pg: _share(_nbytes(a[0]), w)),
    ("_c10d_functional", "all_reduce"): (2, lambda a, w, pg: _share(_nbytes(a[0]), w, 2)),
    ("_c10d_functional", "all_to_all_single"): (3, lambda a, w, pg: _share(_nbytes(a[0]), w)),
    ("c10d", "allreduce_"): (1, lambda a, w, pg: _share(_nbytes(a[0]), w, 2)),
    ("c10d", "allgather_"): (2, lambda a, w, pg: (w - 1) * _nbytes(a[1])),
    ("c10d", "_allgather_base_"): (2, lambda a, w, pg: (w - 1) * _nbytes(a[1])),
    ("c10d", "reduce_scatter_"): (2, lambda a, w, pg: (w - 1) * _nbytes(a[0])),
    ("c10d", "_reduce_scatter_base_"): (2, lambda a, w, pg: (w - 1) * _nbytes(a[0])),
    ("c10d", "alltoall_base_"): (2, lambda a, w, pg: _share(_nbytes(a[1]), w)),
    ("c10d", "send"): (1, lambda a, w, pg: _nbytes(a[0])),
    ("c10d", "broadcast_"): (1, lambda a, w, pg: _nbytes(a[0]) if pg.rank() == a[2] else 0),
}

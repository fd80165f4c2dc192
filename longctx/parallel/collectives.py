"""Bytes every collective moves, per mesh axis, counted where torch issues it (a TorchDispatchMode).

Context-parallel attention counts its own bytes in `Comm`, but tensor parallelism (DTensor redistributes),
FSDP2 (parameter all-gathers, gradient reduce-scatters) and pipelining (stage sends) move data through
torch's own collectives. `CollectiveCounter` sees every one of them as a dispatcher op, functional
(`_c10d_functional.*`, which names its group) or in-place (`c10d.*`, which carries the ProcessGroup), and
adds its bytes to the axis whose group it ran on, in comm.py's convention (what this rank puts on the
wire under the bandwidth-optimal algorithm):

  all-gather      (W-1) x the local chunk          reduce-scatter   (W-1)/W x the input
  all-reduce      2 (W-1)/W x the tensor           all-to-all       (W-1)/W x the input
  send            the tensor                       recv             0        broadcast   the tensor, on the root
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

    def on(self, mesh) -> int:
        """Bytes counted on the group of a 1-D DeviceMesh (0 for None or a single rank)."""
        if mesh is None or mesh.size() == 1:
            return 0
        return self.bytes.get(mesh.get_group().group_name, 0)

    def _add(self, group_name: str, n: int) -> None:
        self.bytes[group_name] += int(n)
        self.calls[group_name] += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ns, name = func.namespace, func.__name__.split(".")[0]
        if ns == "_c10d_functional":
            self._functional(name, args)
        elif ns == "c10d":
            self._inplace(name, args)
        return out

    def _functional(self, name, args):
        if name == "all_gather_into_tensor":
            x, w, g = args[:3]
            self._add(g, (w - 1) * _nbytes(x))
        elif name == "reduce_scatter_tensor":
            x, _, w, g = args[:4]
            self._add(g, _nbytes(x) * (w - 1) // w)
        elif name == "all_reduce":
            x, _, g = args[:3]
            w = torch.distributed.distributed_c10d._resolve_process_group(g).size()
            self._add(g, 2 * _nbytes(x) * (w - 1) // w)
        elif name == "all_to_all_single":
            x, g = args[0], args[3]
            w = torch.distributed.distributed_c10d._resolve_process_group(g).size()
            self._add(g, _nbytes(x) * (w - 1) // w)

    def _inplace(self, name, args):
        if name in ("allreduce_", "allgather_", "_allgather_base_", "reduce_scatter_", "_reduce_scatter_base_",
                    "alltoall_base_", "send", "recv_", "broadcast_"):
            pg = _pg(args[2] if name in ("allgather_", "_allgather_base_", "reduce_scatter_",
                                         "_reduce_scatter_base_", "alltoall_base_") else args[1])
            w, g = pg.size(), pg.group_name
            if name == "allreduce_":
                self._add(g, 2 * _nbytes(args[0]) * (w - 1) // w)
            elif name in ("allgather_", "_allgather_base_"):
                self._add(g, (w - 1) * _nbytes(args[1]))
            elif name in ("reduce_scatter_", "_reduce_scatter_base_"):
                self._add(g, (w - 1) * _nbytes(args[0]))
            elif name == "alltoall_base_":
                self._add(g, _nbytes(args[1]) * (w - 1) // w)
            elif name == "send":
                self._add(g, _nbytes(args[0]))
            elif name == "broadcast_":
                self._add(g, _nbytes(args[0]) if pg.rank() == args[2] else 0)

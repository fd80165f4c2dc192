"""The one module that moves attention data between ranks, and counts every byte it moves.

Counting convention: `bytes` is what this rank puts on the wire under the bandwidth-optimal algorithm of
each operation, which is what the closed-form models in cost.py predict:
  ring send        the tensor sent to the next rank
  all-to-all       (W-1)/W of the input (the chunk a rank keeps is not sent)
  all-gather       (W-1) x the local chunk (a ring all-gather forwards W-1 chunks)
  reduce-scatter   (W-1) x the output chunk
  all-reduce       2 (W-1)/W x the tensor (reduce-scatter + all-gather)
Counters are per process group and per phase ("fwd", "bwd", "data", ...), so tests can assert exact
equality with the model and benchmarks can report what each schedule moved.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def group_device_type(group=None) -> str:
    """The device type a group's collectives take, read from its backend: "cuda" when it has an NCCL
    backend for CUDA ("nccl", or a mixed "cpu:gloo,cuda:nccl" group) and a GPU is present, else "cpu"."""
    backend = str(dist.get_backend(group)).lower()
    if ("nccl" in backend or "cuda" in backend) and torch.cuda.is_available():
        return "cuda"
    return "cpu"


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class OpCount:
    calls: int = 0
    bytes: int = 0


class CommStats:
    """Calls and bytes per (phase, op) for one process group, as seen from this rank."""

    def __init__(self):
        self.ops: dict[tuple[str, str], OpCount] = defaultdict(OpCount)
        # (phase, step) -> pairs summed over calls: bounded by the schedule's step count, so a training
        # run of any length keeps a fixed-size record
        self.work: dict[tuple[str, int], int] = defaultdict(int)

    def record(self, op: str, phase: str, n: int) -> None:
        c = self.ops[(phase, op)]
        c.calls += 1
        c.bytes += int(n)

    def bytes(self, phase: str | None = None, op: str | None = None) -> int:
        return sum(c.bytes for (p, o), c in self.ops.items() if phase in (None, p) and op in (None, o))

    def calls(self, phase: str | None = None, op: str | None = None) -> int:
        return sum(c.calls for (p, o), c in self.ops.items() if phase in (None, p) and op in (None, o))

    def record_work(self, phase: str, step: int, pairs: int) -> None:
        """(query, key) pairs this rank computed at one schedule step: balance is counted, not timed."""
        self.work[(phase, step)] += int(pairs)

    def reset(self) -> None:
        self.ops.clear()
        self.work.clear()

    def as_dict(self) -> dict:
        return {f"{p}/{o}": {"calls": c.calls, "bytes": c.bytes} for (p, o), c in sorted(self.ops.items())}


class Pending:
    """A posted ring transfer: `wait()` returns the received tensor."""

    def __init__(self, works, buf):
        self._works, self._buf = works, buf

    def wait(self) -> torch.Tensor:
        for w in self._works:
            w.wait()
        self._works = []
        return self._buf


class Comm:
    """Collectives and ring transfers over one process group, all counted."""

    _instances: dict = {}

    def __init__(self, group=None, device_type: str | None = None):
        if not dist.is_initialized():
            raise RuntimeError(
                "no process group: sequence-parallel attention needs torch.distributed to be initialised "
                "(torch.distributed.init_process_group, torchrun, or longctx.launch.run)"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.stats = CommStats()
        self.device_type = device_type or group_device_type(group)
        self._global = [dist.get_global_rank(group, r) if group is not None else r for r in range(self.world)]

    @classmethod
    def get(cls, group=None, device_type: str | None = None) -> Comm:
        """The Comm of a group (one per group, so its counters add up). `device_type`: the device the group
        moves tensors of ("cpu", "cuda"); a DeviceMesh knows it, pass mesh.device_type."""
        if not dist.is_initialized():
            return Comm(group)  # raises the "no process group" error
        if hasattr(group, "get_group"):  # a 1-D DeviceMesh: its group, and the device type it was built for
            if group.ndim != 1:
                raise ValueError(f"a {group.ndim}-D DeviceMesh {group.mesh_dim_names} was given where one group is "
                                 "needed; slice one dimension, e.g. mesh['cp']")
            group, device_type = group.get_group(), device_type or group.device_type
        # keyed by the group object itself, so a re-initialised world gets fresh counters and ranks
        key = group if group is not None else dist.group.WORLD
        if key not in cls._instances:
            cls._instances[key] = Comm(group, device_type)
        elif device_type is not None:
            cls._instances[key].device_type = device_type
        return cls._instances[key]

    @classmethod
    def forget(cls) -> None:
        """Drop cached instances (after destroy_process_group)."""
        cls._instances.clear()

    @property
    def device(self) -> torch.device:
        if self.device_type == "cpu":
            return torch.device("cpu")
        return torch.device(self.device_type, torch.accelerator.current_device_index())

    # ---------------------------------------------------------------- point to point
    def ring_exchange(self, send: torch.Tensor, *, phase: str, shift: int = 1) -> Pending:
        """Post send -> rank+shift and recv <- rank-shift together (cannot deadlock at any W)."""
        send = send.contiguous()
        recv = torch.empty_like(send)
        if self.world == 1:
            recv.copy_(send)
            return Pending([], recv)
        dst = self._global[(self.rank + shift) % self.world]
        src = self._global[(self.rank - shift) % self.world]
        ops = [dist.P2POp(dist.isend, send, dst, self.group), dist.P2POp(dist.irecv, recv, src, self.group)]
        works = dist.batch_isend_irecv(ops)
        self.stats.record("send", phase, nbytes(send))
        return Pending(works, recv)

    # ---------------------------------------------------------------- collectives
    def all_to_all(self, x: torch.Tensor, *, phase: str) -> torch.Tensor:
        """Split dim 0 into W chunks; chunk j goes to rank j; returns the received chunks stacked on dim 0."""
        if x.shape[0] % self.world:
            raise ValueError(f"all_to_all needs dim 0 ({x.shape[0]}) divisible by the group size {self.world}; "
                             f"pad or reshape x so dim 0 is a multiple of {self.world} (one equal chunk per rank)")
        x = x.contiguous()
        if self.world == 1:
            return x.clone()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=self.group)
        self.stats.record("all_to_all", phase, nbytes(x) * (self.world - 1) // self.world)
        return out

    def all_gather(self, x: torch.Tensor, *, phase: str, async_op: bool = False):
        """Every rank's x, as a list in rank order (or (Pending-like, list) when async_op)."""
        x = x.contiguous()
        if x.dim() == 0:
            x = x.reshape(1)
        if self.world == 1:
            parts = [x.clone()]
            return (Pending([], parts), parts) if async_op else parts
        flat = torch.empty((self.world, *x.shape), dtype=x.dtype, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            work = _all_gather_single(flat.view(-1, *x.shape[1:]), x, group=self.group, async_op=async_op)
        self.stats.record("all_gather", phase, nbytes(x) * (self.world - 1))
        parts = list(flat.unbind(0))
        return (Pending([work], parts), parts) if async_op else parts

    def reduce_scatter(self, x: torch.Tensor, *, phase: str) -> torch.Tensor:
        """x has W equal chunks on dim 0; returns the sum over ranks of chunk `rank`."""
        if x.shape[0] % self.world:
            raise ValueError(f"reduce_scatter needs dim 0 ({x.shape[0]}) divisible by the group size {self.world}; "
                             f"pad or reshape x so dim 0 is a multiple of {self.world} (one equal chunk per rank)")
        x = x.contiguous()
        if self.world == 1:
            return x.clone()
        out = torch.empty((x.shape[0] // self.world, *x.shape[1:]), dtype=x.dtype, device=x.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            _reduce_scatter_single(out, x, group=self.group)
        self.stats.record("reduce_scatter", phase, nbytes(out) * (self.world - 1))
        return out

    def all_reduce(self, x: torch.Tensor, *, phase: str, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce (sum or max)."""
        if op not in ("sum", "max"):
            raise ValueError(f"all_reduce op must be 'sum' or 'max', got {op!r}")
        if self.world == 1:
            return x
        rop = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op]
        dist.all_reduce(x, op=rop, group=self.group)
        self.stats.record(f"all_reduce_{op}", phase, 2 * nbytes(x) * (self.world - 1) // self.world)
        return x

    def broadcast(self, x: torch.Tensor, *, src: int = 0, phase: str) -> torch.Tensor:
        if self.world == 1:
            return x
        dist.broadcast(x, self._global[src], group=self.group)
        if self.rank == src:
            self.stats.record("broadcast", phase, nbytes(x))
        return x

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier(group=self.group)

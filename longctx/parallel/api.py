"""The public entry point: exact attention over sequence-sharded q, k, v by a named strategy."""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from .allgather import allgather_attention
from .comm import Comm
from .hybrid import check_hybrid_seq, hybrid_attention, hybrid_positions
from .layouts import LAYOUTS, check_seq, positions
from .mesh import hybrid_groups
from .ring import RingSpec, ring_attention
from .ulysses import check_heads, ulysses_attention

STRATEGIES = ("ring", "zigzag", "striped", "allgather", "ulysses", "hybrid")
RING_LAYOUT = {"ring": "contiguous", "zigzag": "zigzag", "striped": "striped"}


def strategy_layout(strategy: str, layout: str | None = None) -> str:
    """The token layout a strategy runs on (ring family: fixed; allgather: zigzag; ulysses: contiguous)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
    if layout is not None and layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")
    if strategy in RING_LAYOUT:
        want = RING_LAYOUT[strategy]
        if layout is not None and layout != want:
            raise ValueError(
                f"layout mismatch: strategy {strategy!r} runs on the {want!r} layout, got layout={layout!r}; "
                f"shard the inputs with longctx.parallel.shard(x, {want!r}) or pick the strategy for {layout!r}"
            )
        return want
    if layout is not None:
        return layout
    return {"allgather": "zigzag", "ulysses": "contiguous", "hybrid": "zigzag"}[strategy]


def _check_device(q: torch.Tensor, comm: Comm) -> None:
    want = comm.device
    if q.device.type != want.type:
        raise ValueError(
            f"q is on {q.device} but the process group communicates {want.type} tensors; move q, k, v to "
            f"{want} (gloo groups take CPU tensors, nccl groups CUDA tensors)"
        )


def _check_positions(given, expected: torch.Tensor) -> None:
    """Position ids (c,) or (B, c), every row the layout's positions for this rank."""
    if given is None:
        return
    given = torch.as_tensor(given)
    rows = given.reshape(-1, given.shape[-1]) if given.dim() else given.reshape(1, 1)
    if rows.shape[-1] != expected.numel() or not torch.equal(rows.cpu(), expected.expand_as(rows)):
        raise ValueError(
            "layout mismatch: the position ids given for this shard are not the ones the strategy's layout "
            f"assigns this rank (expected {expected[:6].tolist()}..., got {given[:6].tolist()}...); shard "
            "inputs with longctx.parallel.shard(x, layout) for the strategy's layout"
        )


def _check_window(window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int (keys each query sees), got {window!r}")


def attention(q, k, v, *, causal: bool = False, strategy: str = "zigzag", group=None, kernel: str = "auto",
              window: int | None = None, scale: float | None = None, layout: str | None = None,
              position_ids=None):
    """Exact attention on this rank's shards q (B, c, H, D), k, v (B, c, H_kv, D).

    The shards must follow the strategy's layout (`strategy_layout`); pass `position_ids` to have that
    checked. `group`: a process group (None = world), or for 'hybrid' a ("ring", "ulysses") DeviceMesh.
    Returns this rank's output shard, same layout, dtype of q.
    """
    layout = strategy_layout(strategy, layout)
    scale, _ = kernels.validate(q, k, v, scale, None)
    _check_window(window)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} tokens but k/v have {k.shape[1]}: shards must be equally long")
    if strategy == "hybrid":
        ug, rg = hybrid_groups(group)
        ucomm, rcomm = Comm.get(ug), Comm.get(rg)
        _check_device(q, rcomm)
        n = q.shape[1] * ucomm.world * rcomm.world
        check_hybrid_seq(layout, n, rcomm.world, ucomm.world)
        check_heads(q.shape[2], k.shape[2], ucomm.world, what="hybrid ulysses")
        _check_positions(position_ids, hybrid_positions(layout, n, rcomm.world, ucomm.world, rcomm.rank,
                                                        ucomm.rank))
        spec = RingSpec(rcomm, layout, causal, window, scale, kernel)
        return hybrid_attention(q, k, v, ulysses_comm=ucomm, spec=spec)
    comm = Comm.get(group)
    _check_device(q, comm)
    n = q.shape[1] * comm.world
    check_seq(layout, n, comm.world, what=f"global sequence length ({q.shape[1]} per rank x {comm.world} ranks)")
    _check_positions(position_ids, positions(layout, n, comm.world, comm.rank))
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, comm=comm, layout=layout, causal=causal, window=window, scale=scale,
                                 kernel=kernel)
    spec = RingSpec(comm, layout, causal, window, scale, kernel)
    if strategy == "allgather":
        return allgather_attention(q, k, v, spec)[0]
    return ring_attention(q, k, v, spec)[0]


class ContextParallelAttention(nn.Module):
    """Holds a strategy and its group so a model can call `attn(q, k, v)` without knowing either."""

    def __init__(self, strategy: str = "zigzag", group=None, *, causal: bool = True, kernel: str = "auto",
                 window: int | None = None, layout: str | None = None):
        super().__init__()
        self.layout = strategy_layout(strategy, layout)
        _check_window(window)
        self.strategy, self.group, self.causal, self.kernel, self.window = strategy, group, causal, kernel, window
        self._checked = None

    def forward(self, q, k, v, position_ids=None, scale=None):
        # every layer of a model gets the same position ids: check them once, not once per layer
        if position_ids is not None and position_ids is self._checked:
            position_ids = None
        else:
            self._checked = position_ids
        return attention(q, k, v, causal=self.causal, strategy=self.strategy, group=self.group,
                         kernel=self.kernel, window=self.window, scale=scale, layout=self.layout,
                         position_ids=position_ids)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, layout={self.layout}, causal={self.causal}, window={self.window}"

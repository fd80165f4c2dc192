"""The public entry point: exact attention over sequence-sharded q, k, v by a named strategy.

A shard's layout cannot be read off its values, so `attention` never guesses it: the caller says how the
shards were cut, by `layout=` or by the shards' `position_ids` (from which the layout is recognised and
checked). A model gets both from one plan object (longctx.model.parallelize), which also shards the batch.
"""

from __future__ import annotations

import torch
from torch import nn

from ... import kernels
from ..comm import Comm
from .allgather import allgather_attention
from .documents import Documents
from .hybrid import hybrid_attention
from .mesh import hybrid_groups
from .registry import STRATEGIES, get_strategy
from .ring import ring_attention
from .schedule import ScheduleSpec, check_sinks
from .ulysses import ulysses_attention

__all__ = ["STRATEGIES", "ContextParallelAttention", "attention", "check_positions"]


def _check_device(q: torch.Tensor, comm: Comm) -> None:
    want = comm.device
    if q.device.type != want.type:
        raise ValueError(
            f"q is on {q.device} but the process group communicates {want.type} tensors; move q, k, v to "
            f"{want} (gloo groups take CPU tensors, nccl groups CUDA tensors)"
        )


def _rows(given) -> torch.Tensor:
    given = torch.as_tensor(given)
    return given.reshape(-1, given.shape[-1]) if given.dim() else given.reshape(1, 1)


def _same(rows: torch.Tensor, expected: torch.Tensor) -> bool:
    """Every row of (host) position ids equals `expected`."""
    return rows.shape[-1] == expected.numel() and torch.equal(rows, expected.expand_as(rows))


def check_positions(given, expected: torch.Tensor) -> None:
    """Position ids (c,) or (B, c), every row the layout's positions for this rank."""
    if given is None:
        return
    if not _same(_rows(given).cpu(), expected):
        raise ValueError(
            "layout mismatch: the position ids given for this shard are not the ones the strategy's layout "
            f"assigns this rank (expected {expected[:6].tolist()}..., got {_rows(given)[0, :6].tolist()}...); "
            "shard inputs with longctx.parallel.shard(x, layout) for the strategy's layout (hybrid: with "
            "group=the context mesh)"
        )


def _detect_layout(strategy, position_ids, n, world, rank, ulysses, comms) -> str:
    """The layout (among those the strategy runs on) whose positions are every rank's `position_ids`. One
    rank's positions can fit two layouts (hybrid's first rank holds the same tokens under contiguous and
    zigzag; allgather's rank 1 of 3 under striped and zigzag), and ranks that chose apart computed a wrong
    answer: the ranks agree on the first layout that fits them all (one all-reduce of a flag per layout)."""
    rows = _rows(position_ids).cpu()
    misses = []
    for layout in strategy.layouts:
        try:
            expected = strategy.rank_positions(layout, n, world, rank, ulysses)
        except ValueError:
            expected = None
        misses.append(0 if expected is not None and _same(rows, expected) else 1)
    own = [layout for layout, missed in zip(strategy.layouts, misses) if not missed]
    flags = torch.tensor(misses, dtype=torch.int32, device=comms[0].device)
    for comm in comms:  # (hybrid: over the ulysses groups, then the ring groups: every rank of the mesh)
        comm.all_reduce(flags, phase="layout", op="max")
    for layout, missed in zip(strategy.layouts, flags.tolist()):
        if not missed:
            return layout
    which = (f"fit {', '.join(own)}, which other ranks' shards do not" if own else
             f"follow none of the layouts strategy {strategy.name!r} runs on ({', '.join(strategy.layouts)})")
    raise ValueError(
        f"layout mismatch: the position ids of this shard (starting {rows[0, :6].tolist()}) {which}; shard q, k, v "
        f"with longctx.parallel.shard(x, layout) for one layout on every rank (hybrid: with group=the context mesh)"
    )


def _check_documents(documents, n: int, batch: int) -> None:
    if documents is None:
        return
    if not isinstance(documents, Documents):
        raise TypeError(f"documents must be a longctx.parallel.Documents (Documents.from_ids(doc_ids) of the "
                        f"full batch), got {type(documents).__name__}")
    documents.check_seq_len(n)
    documents.groups(batch)


def _check_window(window) -> None:
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be None or a positive int (keys each query sees), got {window!r}")


def attention(q, k, v, *, causal: bool = False, strategy: str = "zigzag", group=None, kernel: str = "auto",
              window: int | None = None, scale: float | None = None, layout: str | None = None,
              position_ids=None, check: bool = True, documents: Documents | None = None, sinks=None,
              softcap: float | None = None):
    """Exact attention on this rank's shards q (B, c, H, D), k, v (B, c, H_kv, D).

    Say how the shards were cut: `layout=` (what longctx.parallel.shard used) and/or `position_ids=` (the
    global positions of this shard's tokens; checked against the layout, or used to recognise it). `group`:
    a process group (None = world), or for 'hybrid' a ("ring", "ulysses") DeviceMesh. `check=False` skips
    the position check (a caller that made the positions from the same plan). `documents`: where packed
    documents start (longctx.parallel.Documents, the same on every rank); attention then stays inside each
    document and blocks no document spans are skipped. `sinks`: attention sinks (gpt-oss), one logit per
    query head (H,): each row's softmax gets one more key with that logit and a zero value; differentiable.
    `softcap`: logit soft-capping (Gemma 2): every score s becomes softcap * tanh(s / softcap).
    Returns this rank's output shard, same layout, dtype of q. Every rank's shards must be equally long (as
    longctx.parallel.shard cuts them); that is not checked, since it would cost a collective per call:
    unequal ones fail inside the process group's transport (gloo aborts the rank, and the others fail after it).
    """
    strat = get_strategy(strategy)
    if layout is None and position_ids is None:
        raise ValueError(
            f"attention() needs to know how q, k, v were sharded: pass layout= (the one given to "
            f"longctx.parallel.shard; strategy {strategy!r} runs on {', '.join(strat.layouts)}) or position_ids= "
            "of this shard; a model gets both from the plan of longctx.model.parallelize"
        )
    if layout is not None:
        layout = strat.layout(layout)
    scale, _ = kernels.validate(q, k, v, scale, None)
    _check_window(window)
    check_sinks(sinks, q)
    softcap = kernels.check_softcap(softcap)
    if kernel != "auto":  # before any transfer: a refusal inside the loop leaves a posted send/recv behind it
        kernels.resolve(kernel, q, k, v, kernels.NO_MASK, softcap)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} tokens but k/v have {k.shape[1]}: shards must be equally long; "
                         "shard q, k and v of the same sequence with the same layout (for decoding against a longer "
                         "cache use longctx.parallel.sequence.tree.tree_decode)")
    if strategy == "hybrid":
        ug, rg, device_type = hybrid_groups(group)
        ucomm, comm = Comm.get(ug, device_type), Comm.get(rg, device_type)
        ulysses, world, rank = ucomm.world, ucomm.world * comm.world, comm.rank * ucomm.world + ucomm.rank
    else:
        comm = Comm.get(group)
        ulysses, world, rank = 1, comm.world, comm.rank
    _check_device(q, comm)
    n = q.shape[1] * world
    _check_documents(documents, n, q.shape[0])
    recognised = layout is None  # recognising the layout compares the positions already
    if recognised:
        layout = _detect_layout(strat, position_ids, n, world, rank, ulysses,
                                (ucomm, comm) if strategy == "hybrid" else (comm,))
    strat.check(seq_len=n, world=world, layout=layout, heads=q.shape[2], kv_heads=k.shape[2], ulysses=ulysses,
                what=f"global sequence length ({q.shape[1]} per rank x {world} ranks)")
    if check and position_ids is not None and not recognised:
        check_positions(position_ids, strat.rank_positions(layout, n, world, rank, ulysses))
    if strategy == "ulysses":
        return ulysses_attention(q, k, v, comm=comm, layout=layout, causal=causal, window=window, scale=scale,
                                 kernel=kernel, documents=documents, sinks=sinks, softcap=softcap)
    spec = ScheduleSpec(comm, layout, causal, window, scale, kernel, documents, softcap)
    if strategy == "hybrid":
        return hybrid_attention(q, k, v, ulysses_comm=ucomm, spec=spec, sinks=sinks)
    if strategy == "allgather":
        return allgather_attention(q, k, v, spec, sinks)[0]
    return ring_attention(q, k, v, spec, sinks)[0]


class ContextParallelAttention(nn.Module):
    """Holds a strategy, its layout and its group so a model can call `attn(q, k, v)` without knowing them.

    `check_positions=False` is for cores installed by a plan: the plan made the position ids from the same
    layout and checks them once per forward (not once per layer)."""

    def __init__(self, strategy: str = "zigzag", group=None, *, causal: bool = True, kernel: str = "auto",
                 window: int | None = None, layout: str | None = None, check_positions: bool = True):
        super().__init__()
        self.layout = get_strategy(strategy).layout(layout)
        _check_window(window)
        self.strategy, self.group, self.causal, self.kernel, self.window = strategy, group, causal, kernel, window
        self.check_positions = check_positions

    def forward(self, q, k, v, position_ids=None, scale=None, documents=None, sinks=None, softcap=None):
        return attention(q, k, v, causal=self.causal, strategy=self.strategy, group=self.group,
                         kernel=self.kernel, window=self.window, scale=scale, layout=self.layout,
                         position_ids=position_ids, check=self.check_positions, documents=documents, sinks=sinks,
                         softcap=softcap)

    def extra_repr(self) -> str:
        return f"strategy={self.strategy}, layout={self.layout}, causal={self.causal}, window={self.window}"

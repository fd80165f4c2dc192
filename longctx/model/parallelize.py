"""Apply context parallelism to a built model (torchtitan style: the model stays unaware)."""

from __future__ import annotations

from torch import nn

from ..parallel import ContextParallelAttention
from .llama import LocalAttention


def apply_context_parallel(model: nn.Module, strategy: str = "zigzag", group=None, *, kernel: str | None = None,
                           layout: str | None = None) -> str:
    """Swap every LocalAttention core for the sequence-parallel one. Returns the token layout the data
    path must shard batches with (shard_batch) and take position ids from. For 'hybrid' it is the layout of
    the ring part: shard with longctx.parallel.shard_hybrid / hybrid_positions instead."""
    swapped, layout_used = 0, None
    for module in model.modules():
        core = getattr(module, "core", None)
        if isinstance(core, LocalAttention):
            cp = ContextParallelAttention(strategy, group, causal=core.causal, kernel=kernel or core.kernel,
                                          window=core.window, layout=layout)
            module.core = cp
            layout_used = cp.layout
            swapped += 1
    if not swapped:
        raise ValueError("apply_context_parallel found no LocalAttention cores to replace (already applied?)")
    return layout_used

"""Sequence-parallel attention: the building blocks every context-parallel layout is made of.

  documents  where packed documents start (attention stays inside each)
  layouts    which global positions each rank holds (contiguous, zigzag, striped)
  plan       per-(rank, step) block tables derived from those positions and the mask
  schedule   the spec, the kernel calls on one held K/V shard, the autograd Function of a schedule
  ring / allgather / ulysses / hybrid    the schedules
  registry   one entry per strategy: layouts, validation, comm and work models
  api        `attention(...)` and `ContextParallelAttention`
  tree       decoding over a sharded KV cache;  dilated (+ dilated_dist)  LongNet attention
  cost       the closed-form byte models the registry uses
"""

from .api import ContextParallelAttention, attention
from .dilated import LOCAL, DilatedAttention, check_pattern, dilated_attention, dilated_comm_model, dilated_config
from .dilated_dist import dilated_comms
from .documents import Documents
from .hybrid import hybrid_positions, shard_hybrid
from .layouts import LAYOUTS, permutation, positions, shard, shard_batch, unshard
from .mesh import context_mesh
from .plan import Block, step_blocks, work_table
from .registry import REGISTRY, STRATEGIES, Strategy, comm_model, get_strategy, strategy_layout, work_model
from .tree import ShardedKVCache, ring_decode, ring_decode_comm_model, tree_comm_model, tree_decode

__all__ = [
    "STRATEGIES", "REGISTRY", "Strategy", "get_strategy", "ContextParallelAttention", "attention",
    "strategy_layout", "comm_model", "work_model", "hybrid_positions", "shard_hybrid", "LAYOUTS", "permutation",
    "positions", "shard", "shard_batch", "unshard", "context_mesh", "Block", "step_blocks", "work_table", "LOCAL",
    "DilatedAttention", "check_pattern", "dilated_attention", "dilated_comm_model", "dilated_config",
    "dilated_comms", "Documents", "ShardedKVCache", "ring_decode", "ring_decode_comm_model", "tree_comm_model",
    "tree_decode",
]

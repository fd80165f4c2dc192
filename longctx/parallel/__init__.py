"""Everything that crosses devices: layouts, the counted comm layer, and the attention schedules."""

from .api import STRATEGIES, ContextParallelAttention, attention, strategy_layout
from .comm import Comm, CommStats
from .cost import comm_model, work_model
from .dilated import LOCAL, DilatedAttention, check_pattern, dilated_attention, dilated_comm_model, dilated_config
from .dilated_dist import dilated_comms
from .hybrid import hybrid_positions, shard_hybrid
from .layouts import LAYOUTS, permutation, positions, shard, shard_batch, unshard
from .mesh import context_mesh
from .plan import Block, step_blocks, work_table
from .tree import ShardedKVCache, ring_decode, ring_decode_comm_model, tree_comm_model, tree_decode

__all__ = [
    "STRATEGIES", "ContextParallelAttention", "attention", "strategy_layout", "Comm", "CommStats", "comm_model",
    "work_model", "hybrid_positions", "shard_hybrid", "LAYOUTS", "permutation", "positions", "shard",
    "shard_batch", "unshard", "context_mesh", "Block", "step_blocks", "work_table", "LOCAL", "DilatedAttention",
    "check_pattern", "dilated_attention", "dilated_comm_model", "dilated_config", "dilated_comms", "ShardedKVCache",
    "ring_decode", "ring_decode_comm_model", "tree_comm_model", "tree_decode",
]

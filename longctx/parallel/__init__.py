"""Everything that crosses devices: layouts, the counted comm layer, and the attention schedules."""

from .api import STRATEGIES, ContextParallelAttention, attention, strategy_layout
from .comm import Comm, CommStats
from .cost import comm_model, work_model
from .hybrid import hybrid_positions, shard_hybrid
from .layouts import LAYOUTS, permutation, positions, shard, shard_batch, unshard
from .mesh import context_mesh
from .plan import Block, step_blocks, work_table

__all__ = [
    "STRATEGIES", "ContextParallelAttention", "attention", "strategy_layout", "Comm", "CommStats", "comm_model",
    "work_model", "hybrid_positions", "shard_hybrid", "LAYOUTS", "permutation", "positions", "shard",
    "shard_batch", "unshard", "context_mesh", "Block", "step_blocks", "work_table",
]

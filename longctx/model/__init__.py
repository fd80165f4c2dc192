"""A Llama-style decoder (no distributed code) and `parallelize`, which applies the parallel axes to it."""

from .llama import LocalAttention, Transformer, build_model
from .parallelize import Plan, apply_activation_checkpointing, apply_context_parallel, parallelize

__all__ = ["LocalAttention", "Transformer", "build_model", "Plan", "apply_activation_checkpointing",
           "apply_context_parallel", "parallelize"]

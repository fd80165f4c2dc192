"""A Llama-style decoder whose attention core is pluggable; it holds no distributed code."""

from .llama import LocalAttention, Transformer, build_model
from .parallelize import apply_context_parallel

__all__ = ["LocalAttention", "Transformer", "build_model", "apply_context_parallel"]

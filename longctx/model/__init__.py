"""A Llama-style decoder (no distributed code) and `parallelize`, which applies the parallel axes to it;
`parallelize_hf` does the same for Hugging Face causal LMs (longctx.model.hf)."""

from .hf import HFCausalLM, parallelize_hf
from .llama import LocalAttention, Transformer, build_model
from .parallelize import Plan, apply_activation_checkpointing, apply_context_parallel, parallelize

__all__ = ["HFCausalLM", "LocalAttention", "Transformer", "build_model", "Plan", "apply_activation_checkpointing",
           "apply_context_parallel", "parallelize", "parallelize_hf"]

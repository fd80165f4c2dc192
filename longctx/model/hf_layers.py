"""What an attention layer of a transformers model computes beyond its call's arguments, reproduced under
context parallelism: a sliding window some modules leave to transformers' mask alone (Qwen2-MoE, PhiMoE),
Llama 4's chunked attention (a layer type whose mask transformers would build and the adapter does not
take) and its query temperature (queries of the no-RoPE layers scaled by a function of each
token's position, which the module counts from the length of its call: a context shard's, a decode step's).
The adapter (hf.py) asks these of every attention call."""

from __future__ import annotations

import functools

import torch

from ..parallel.sequence.documents import Documents
from .hf_flops import config_chunk, config_window


def layer_window(module, passed) -> int | None:
    """The sliding window of an attention call: the one the module passed, else the one transformers' mask
    would give its layer (hf_flops.config_window). Some modules never pass it (Qwen2-MoE, PhiMoE); the
    adapter takes no mask, so their windowed layers would silently attend the whole causal context."""
    if passed:
        return int(passed)
    config, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    return None if config is None or layer is None else config_window(config, layer)


def attention_chunk(module) -> int | None:
    """The chunk of a chunked-attention layer (each token sees the keys of its own `chunk`-token chunk), or
    None for a layer of another type."""
    config, layer = getattr(module, "config", None), getattr(module, "layer_idx", None)
    return None if config is None or layer is None else config_chunk(config, layer)


@functools.lru_cache(maxsize=64)
def chunk_documents(documents: Documents | None, seq_len: int, chunk: int) -> Documents:
    """The packed documents (None: one per sequence) of a `seq_len`-token sequence cut into attention chunks."""
    return (documents or Documents(seq_len, ((0,),))).chunked(chunk)


def _temperature(module, positions: torch.Tensor) -> torch.Tensor:
    """Llama 4's query scale at each position: 1 + attn_scale * log(1 + floor((p + 1) / floor_scale))."""
    steps = torch.floor((positions.float() + 1.0) / module.floor_scale)
    return torch.log1p(steps) * module.attn_scale + 1.0


def retemper_queries(module, q: torch.Tensor, positions) -> torch.Tensor:
    """q (B, S, H, D) of a layer that scales its queries by position (Llama 4's attn_temperature_tuning on its
    no-RoPE layers): the module scaled them by the positions 0..S-1 of its own call; rescale them by each
    token's true position (`positions` (B|1, S), inside its document as RoPE counts). Other layers: q."""
    if not (getattr(module, "attn_temperature_tuning", False) and not getattr(module, "use_rope", True)):
        return q
    if positions is None:
        raise ValueError(f"{type(module).__name__} scales its queries by position, but the call carries no positions; "
                         "run it through longctx's HFCausalLM (it passes them)")
    local = _temperature(module, torch.arange(q.shape[1], device=q.device))
    true = _temperature(module, positions.to(q.device))
    return (q.float() * (true / local)[..., None, None]).to(q.dtype)  # one rounding, as transformers does

"""What one token costs in a transformers model, read from its config: the attention of every layer (its
projections' matmul parameters, q/k and v head widths, and the window or chunk its keys are cut to) and
the MLP width a token passes through (the experts it is routed to). FLOPs and MFU (train/metrics.py) and the
memory floors of evaluation (train/machine.py) count these, not a uniform full-attention stack."""

from __future__ import annotations


def layer_config(hf_config, layer: int):
    """The config of one layer: the layer's view of a heterogeneous config (Gemma 4 widens the heads of its
    full-attention layers through per_layer_config), else the config itself."""
    return hf_config.per_layer_config[layer] if getattr(hf_config, "is_heterogeneous", False) else hf_config


def _head_dim(c) -> int:
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def config_window(hf_config, layer: int) -> int | None:
    """The sliding window transformers' mask gives `layer`: a sliding_attention entry of layer_types, or without
    layer_types a sliding_window for every layer (unless use_sliding_window is off)."""
    c = layer_config(hf_config, layer)
    window = getattr(c, "sliding_window", None)
    if not window or getattr(c, "use_sliding_window", True) is False:
        return None
    types = getattr(c, "layer_types", None)
    if types:
        return int(window) if types[layer] == "sliding_attention" else None
    return int(window)


def config_chunk(hf_config, layer: int) -> int | None:
    """The chunk of a chunked_attention layer (Llama 4: a token sees the keys of its own chunk), else None."""
    c = layer_config(hf_config, layer)
    if (getattr(c, "layer_types", None) or [None] * (layer + 1))[layer] != "chunked_attention":
        return None
    if not getattr(c, "attention_chunk_size", None):
        raise ValueError(f"layer {layer} is a chunked_attention layer but the config has no attention_chunk_size; "
                         "set attention_chunk_size in its config.json (tokens per chunk)")
    return int(c.attention_chunk_size)


def attention_layers(hf_config) -> list[dict]:
    """Per decoder layer: `qk_dim` and `v_dim` (head widths), `kv_heads`, `params` (matmul parameters of its
    q/k/v/o projections: low-rank ones for latent attention, no v for Gemma 4's full layers whose values are
    their keys), `window` (keys a query sees, sliding layers) and `chunk` (chunked layers: Llama 4)."""
    out = []
    for i in range(hf_config.num_hidden_layers):
        c, window = layer_config(hf_config, i), config_window(hf_config, i)
        heads, dim = c.num_attention_heads, c.hidden_size
        kv_heads = getattr(c, "num_key_value_heads", None) or heads
        latent = latent_attention(c)
        if latent is not None:
            layer = dict(latent)
        else:
            hd = _head_dim(c)
            values_are_keys = getattr(c, "attention_k_eq_v", False) and window is None
            layer = {"qk_dim": hd, "v_dim": hd,
                     "params": 2 * dim * heads * hd + (1 if values_are_keys else 2) * dim * kv_heads * hd}
        layer.update(kv_heads=kv_heads, window=window, chunk=config_chunk(hf_config, i))
        out.append(layer)
    return out


# MoE layers with shared experts the config has no key for: Llama 4's every MoE layer adds one of the routed
# experts' width
_IMPLICIT_SHARED_EXPERTS = {"llama4_text": 1}


def active_ffn_width(hf_config) -> int:
    """The MLP width one token passes through, averaged over the layers: a dense MLP's intermediate_size;
    for a mixture of experts (gpt-oss, Mixtral, Qwen-MoE, DeepSeek, GLM-MoE, Llama 4, Ernie 4.5) the
    num_experts_per_tok experts it is routed to plus any shared experts, on the layers that are sparse
    (Qwen-MoE's decoder_sparse_step and mlp_only_layers; DeepSeek's dense first_k_dense_replace layers;
    Llama 4's moe_layers, its dense ones intermediate_size_mlp wide; Ernie's moe_layer_start/end_index).
    FLOPs and MFU then count the work done, not every expert's parameters; the router (dim x experts per
    token, under 1% of an expert's matmuls in these models) is not counted."""
    c = hf_config
    routed = getattr(c, "num_experts_per_tok", None)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None) or \
        getattr(c, "n_routed_experts", None)
    # the dense MLP's width (Llama 4 names it apart from its experts'; a model of experts only has none)
    dense = getattr(c, "intermediate_size_mlp", None) or getattr(c, "intermediate_size", None) or \
        getattr(c, "ffn_dim", None)
    if not routed or not experts:
        return dense
    expert_width = getattr(c, "moe_intermediate_size", None) or c.intermediate_size
    shared_count = getattr(c, "n_shared_experts", None) or getattr(c, "moe_num_shared_experts", None) or \
        _IMPLICIT_SHARED_EXPERTS.get(c.model_type, 0)
    shared = getattr(c, "shared_expert_intermediate_size", None) or shared_count * expert_width
    sparse = routed * expert_width + shared
    moe_layers = getattr(c, "moe_layers", None)
    if moe_layers is not None:
        is_sparse = [i in set(moe_layers) for i in range(c.num_hidden_layers)]
    elif getattr(c, "moe_layer_start_index", None) is not None:  # Ernie 4.5: every interval-th in [start, end]
        every, first, last = c.moe_layer_interval, c.moe_layer_start_index, c.moe_layer_end_index
        is_sparse = [(i + 1) % every == 0 and first <= i <= last for i in range(c.num_hidden_layers)]
    else:
        step = getattr(c, "decoder_sparse_step", None) or 1
        dense_layers = set(getattr(c, "mlp_only_layers", None) or []) | \
            set(range(getattr(c, "first_k_dense_replace", None) or 0))
        is_sparse = [(i + 1) % step == 0 and i not in dense_layers for i in range(c.num_hidden_layers)]
    widths = [sparse if s or dense is None else dense for s in is_sparse]
    return round(sum(widths) / len(widths))


def latent_attention(hf_config) -> dict | None:
    """Multi-head latent attention (DeepSeek-V2/V3, Kimi K2, LongCat): its q/k head width (`qk_dim`: the
    no-RoPE and RoPE parts), value head width (`v_dim`) and the matmul parameters of one layer's low-rank
    projections (`params`: q down/up or q, the joint k/v down-projection with the shared RoPE key, k/v up,
    o), which FLOPs count instead of the q/k/v/o of full-rank heads; None for other attention."""
    c = hf_config
    if getattr(c, "kv_lora_rank", None) is None or getattr(c, "v_head_dim", None) is None:
        return None
    heads, dim = c.num_attention_heads, c.hidden_size
    nope, rope, v = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
    q_rank = getattr(c, "q_lora_rank", None)
    q = dim * q_rank + q_rank * heads * (nope + rope) if q_rank else dim * heads * (nope + rope)
    kv = dim * (c.kv_lora_rank + rope) + c.kv_lora_rank * heads * (nope + v)
    return {"qk_dim": nope + rope, "v_dim": v, "params": q + kv + heads * v * dim}

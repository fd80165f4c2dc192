"""Weights between longctx's Llama and Hugging Face's LlamaForCausalLM, both directions.

The two compute the same function: RMSNorm in fp32 scaled by its weight, RoPE on the two halves of each
head (HF's rotate_half convention; longctx's `rope`), SwiGLU with gate (w1), up (w3) and down (w2)
projections, no biases, untied output. Only names differ, listed once in `_NAMES`.
"""

from __future__ import annotations

import torch

from .._optional import require
from ..config import head_dim_of

_NAMES = {  # longctx name (per layer: {i}) -> HF LlamaForCausalLM name
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "layers.{i}.attention.wq.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "layers.{i}.attention.wk.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "layers.{i}.attention.wv.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "layers.{i}.attention.wo.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "layers.{i}.attention_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "layers.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "layers.{i}.feed_forward.w1.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "layers.{i}.feed_forward.w3.weight": "model.layers.{i}.mlp.up_proj.weight",
    "layers.{i}.feed_forward.w2.weight": "model.layers.{i}.mlp.down_proj.weight",
}


def _pairs(n_layers: int):
    for ours, theirs in _NAMES.items():
        if "{i}" in ours:
            for i in range(n_layers):
                yield ours.format(i=i), theirs.format(i=i)
        else:
            yield ours, theirs


def hf_names(n_layers: int) -> dict:
    """{longctx name: HF LlamaForCausalLM name} of every weight of an n_layers model."""
    return dict(_pairs(n_layers))


def hf_llama_config(cfg, max_positions: int = 8192):
    """A transformers LlamaConfig for longctx's ModelConfig (full causal attention only)."""
    transformers = require("transformers", "Hugging Face export")
    if cfg.window is not None or cfg.dilated.layers:
        raise ValueError("export --format hf takes full causal Llama models; model.window and model.dilated.layers "
                         "have no LlamaForCausalLM equivalent")
    return transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
        head_dim=head_dim_of(cfg), rms_norm_eps=cfg.norm_eps, max_position_embeddings=max_positions,
        rope_parameters=_hf_rope(cfg), tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, architectures=["LlamaForCausalLM"])


# model.rope_scaling's keys -> transformers' rope_parameters keys, per type
_ROPE_KEYS = {"linear": {"factor": "factor"},
              "llama3": {"factor": "factor", "low_freq_factor": "low_freq_factor",
                         "high_freq_factor": "high_freq_factor",
                         "original_max_positions": "original_max_position_embeddings"},
              "yarn": {"factor": "factor", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
                       "original_max_positions": "original_max_position_embeddings"}}


def _hf_rope(cfg) -> dict:
    """transformers' rope_parameters for model.rope_theta and model.rope_scaling."""
    r = cfg.rope_scaling
    if r.type == "none":
        return {"rope_type": "default", "rope_theta": cfg.rope_theta}
    return {"rope_type": r.type, "rope_theta": cfg.rope_theta,
            **{theirs: getattr(r, ours) for ours, theirs in _ROPE_KEYS[r.type].items()}}


def _rope_scaling(rope: dict, where: str) -> dict:
    """model.rope_scaling for transformers' rope_parameters, or a ValueError for a RoPE longctx lacks."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {"type": "none"}
    if kind not in _ROPE_KEYS:
        raise ValueError(f"{where}: rope_type {kind!r} has no longctx equivalent (plain, linear, llama3 and yarn "
                         "do); train it as it is with model.hf_path")
    known = {"rope_type", "rope_theta", *_ROPE_KEYS[kind].values()}
    # yarn's optional temperature settings: only transformers' defaults are longctx's yarn
    # and `type`: a config.json in the older rope_scaling form names the kind so, kept beside rope_type on reading
    extra = {k: v for k, v in rope.items() if k not in known and v is not None and not (k == "truncate" and v)
             and not (k == "type" and v == kind)}
    if extra:
        raise ValueError(f"{where}: rope_parameters {sorted(extra)} are not longctx's {kind} RoPE; train it as it is "
                         "with model.hf_path")
    return {"type": kind, **{ours: rope[theirs] for ours, theirs in _ROPE_KEYS[kind].items() if theirs in rope}}


def to_hf_state(state: dict, n_layers: int) -> dict:
    missing = [ours for ours, _ in _pairs(n_layers) if ours not in state]
    if missing:
        raise ValueError(f"the state dict is not a longctx Llama of {n_layers} layers (missing {missing[:3]})")
    return {theirs: state[ours].contiguous() for ours, theirs in _pairs(n_layers)}


def from_hf_state(state: dict, n_layers: int) -> dict:
    out = {}
    for ours, theirs in _pairs(n_layers):
        if theirs not in state:
            if theirs == "lm_head.weight" and "model.embed_tokens.weight" in state:  # tied embeddings
                out[ours] = state["model.embed_tokens.weight"].clone()
                continue
            raise ValueError(f"the checkpoint has no {theirs!r}: not a LlamaForCausalLM of {n_layers} layers")
        out[ours] = state[theirs]
    return out


def save_hf_llama(state: dict, cfg, out_dir: str, max_positions: int = 8192) -> str:
    """longctx Llama weights -> an HF directory (config.json + model.safetensors) that transformers loads."""
    transformers = require("transformers", "Hugging Face export")
    hf_cfg = hf_llama_config(cfg, max_positions)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    model.load_state_dict(to_hf_state(state, cfg.n_layers), assign=True, strict=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def llama_config(c, where: str):
    """longctx's ModelConfig for an HF LlamaForCausalLM config, or a ValueError saying why there is none."""
    from ..config import ModelConfig

    arch = (getattr(c, "architectures", None) or ["?"])[0]
    if arch != "LlamaForCausalLM":
        raise ValueError(f"{where} holds a {arch}; longctx's own Llama loads LlamaForCausalLM checkpoints (train "
                         "other architectures as they are with model.hf_path)")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError(f"{where}: a Llama with biases has no longctx equivalent (train it with model.hf_path)")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: a Llama whose MLP activation is {c.hidden_act!r} has no longctx equivalent (its "
                         "MLP is SwiGLU, silu); train it with model.hf_path")
    from ..config import RopeScalingConfig
    from .hf_checks import rope_base

    rope = getattr(c, "rope_parameters", None) or {}
    return ModelConfig(vocab_size=c.vocab_size, dim=c.hidden_size, n_layers=c.num_hidden_layers,
                       n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, ffn_dim=c.intermediate_size,
                       head_dim=explicit_head_dim(c), rope_theta=float(rope_base(c)),
                       rope_scaling=RopeScalingConfig(**_rope_scaling(rope, where)), norm_eps=float(c.rms_norm_eps))


def explicit_head_dim(c) -> int | None:
    """An HF config's head_dim when it is not hidden_size / heads (transformers always fills it in)."""
    hd = getattr(c, "head_dim", None)
    return None if hd is None or hd * c.num_attention_heads == c.hidden_size else int(hd)


def llama_from_hf_state(state: dict, hf_config, where: str):
    """(longctx Transformer with the weights of an HF Llama state dict, its ModelConfig)."""
    from .llama import build_model

    cfg = llama_config(hf_config, where)
    model = build_model(cfg)
    model.load_state_dict(from_hf_state(state, cfg.n_layers), strict=True)
    return model, cfg


def load_hf_llama(path: str):
    """A local HF LlamaForCausalLM directory -> (longctx Transformer with its weights, ModelConfig)."""
    from .hf_checks import read_hf_config

    transformers = require("transformers", "Hugging Face models")
    c = read_hf_config(path)
    llama_config(c, repr(path))  # the architecture is checked before any weight is read
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    return llama_from_hf_state(hf.state_dict(), c, repr(path))

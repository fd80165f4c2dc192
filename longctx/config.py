"""Structured configs (OmegaConf): typed defaults, YAML files, dotted command-line overrides."""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import OmegaConf


@dataclass
class AttentionConfig:
    impl: str = "local"  # local | context_parallel | dilated
    strategy: str = "zigzag"  # context_parallel: ring, zigzag, striped, allgather, ulysses, hybrid
    kernel: str = "auto"
    window: int | None = None
    # dilated (LongNet): explicit lists, or empty to derive a geometric pattern from w0/alpha
    segment_lengths: list[int] = field(default_factory=list)
    dilation_rates: list[int] = field(default_factory=list)
    dilated_w0: int = 64
    dilated_alpha: int = 2
    dilated_layers: list[int] | None = None  # None: every layer when impl == dilated


@dataclass
class ModelConfig:
    vocab_size: int = 256  # the byte-level tokenizer needs no download
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 352
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    attention: AttentionConfig = field(default_factory=AttentionConfig)


def load(cls=ModelConfig, path: str | None = None, overrides: list[str] | tuple = ()):
    """Defaults of `cls`, merged with a YAML file and `key=value` overrides; unknown keys are errors."""
    cfg = OmegaConf.structured(cls)
    if path:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    return cfg


def validate_model(cfg) -> None:
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"model.dim {cfg.dim} must be divisible by model.n_heads {cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"model.n_heads {cfg.n_heads} must be a multiple of model.n_kv_heads {cfg.n_kv_heads} (GQA groups)"
        )
    if (cfg.dim // cfg.n_heads) % 2:
        raise ValueError(f"head_dim {cfg.dim // cfg.n_heads} must be even for RoPE; change model.dim or n_heads")
    if cfg.attention.impl not in ("local", "context_parallel", "dilated"):
        raise ValueError(f"model.attention.impl {cfg.attention.impl!r}: choose local, context_parallel or dilated")

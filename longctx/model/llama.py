"""Llama-style decoder: RMSNorm, RoPE on true positions, SwiGLU, GQA.

Nothing here knows which attention schedule runs: each layer's `attention.core` is a module called as
core(q, k, v, position_ids=...) on (batch, seq, heads, head_dim) tensors, swapped by parallelize.py.
Position ids come from the data layout, so a sharded sequence gets the RoPE phases of its true positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..config import ModelConfig, validate_model


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate (B, S, H, D) by the angles of `position_ids` (S,) or (B, S); computed in fp32."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d))
    ang = position_ids.to(device=x.device, dtype=torch.float32)[..., None] * inv  # (.., S, D/2)
    if ang.dim() == 2:
        ang = ang[None]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class LocalAttention(nn.Module):
    """Single-device causal attention through the kernel contract."""

    def __init__(self, causal: bool = True, window: int | None = None, kernel: str = "auto"):
        super().__init__()
        self.causal, self.window, self.kernel = causal, window, kernel

    def forward(self, q, k, v, position_ids=None):
        mask = kernels.Mask.from_flags(self.causal, self.window)
        return kernels.attention(q, k, v, mask=mask, backend=self.kernel)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, core: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.dim // cfg.n_heads
        self.theta = cfg.rope_theta
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = core

    def forward(self, x, position_ids):
        b, s, _ = x.shape
        q = self.wq(x).view(b, s, self.n_heads, self.head_dim)
        k = self.wk(x).view(b, s, self.n_kv, self.head_dim)
        v = self.wv(x).view(b, s, self.n_kv, self.head_dim)
        q, k = rope(q, position_ids, self.theta), rope(k, position_ids, self.theta)
        o = self.core(q, k, v, position_ids=position_ids)
        return self.wo(o.reshape(b, s, -1))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, core: nn.Module):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, core)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim)

    def forward(self, x, position_ids):
        x = x + self.attention(self.attention_norm(x), position_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, cores: list[nn.Module] | None = None):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        cores = cores or [LocalAttention(window=cfg.attention.window, kernel=cfg.attention.kernel)
                          for _ in range(cfg.n_layers)]
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, core) for core in cores)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, position_ids)
        return self.output(self.norm(h))


def _dilated_core(cfg: ModelConfig, seq_len: int | None, group=None) -> nn.Module:
    from ..parallel.dilated import DilatedAttention, dilated_config

    a = cfg.attention
    if a.segment_lengths:
        ws, rs = list(a.segment_lengths), list(a.dilation_rates)
    elif seq_len is not None:
        ws, rs = dilated_config(seq_len, w0=a.dilated_w0, alpha=a.dilated_alpha)
    else:
        raise ValueError(
            "model.attention.impl=dilated needs segment_lengths/dilation_rates, or call "
            "build_model(cfg, seq_len=N) so a geometric pattern can be derived from dilated_w0/dilated_alpha"
        )
    return DilatedAttention(ws, rs, causal=True, kernel=a.kernel, group=group)


def build_model(cfg: ModelConfig, *, seq_len: int | None = None, group=None) -> Transformer:
    """Build from config. impl=context_parallel swaps every core for attention.strategy over `group`;
    impl=dilated puts LongNet cores on the layers in attention.dilated_layers (all when None)."""
    validate_model(cfg)
    a = cfg.attention
    cores = []
    for i in range(cfg.n_layers):
        if a.impl == "dilated" and (a.dilated_layers is None or i in a.dilated_layers):
            cores.append(_dilated_core(cfg, seq_len, group))
        else:
            cores.append(LocalAttention(window=a.window, kernel=a.kernel))
    model = Transformer(cfg, cores)
    if a.impl == "context_parallel":
        from .parallelize import apply_context_parallel

        apply_context_parallel(model, a.strategy, group, kernel=a.kernel)
    return model

"""Rotary position embeddings and the ways a model's RoPE is stretched past the length it was trained at.

`rope_frequencies` gives each pair of a head's features its rotation per position (and a factor on the
rotated values); `rope` rotates by them. The scalings (model.rope_scaling.type) change only the
frequencies, so every context-parallel layout applies them unchanged (each rank rotates its tokens by
their true positions):

- linear (position interpolation): every frequency divided by `factor`, positions squeezed into the
  trained range;
- llama3 (Llama 3.1's): wavelengths shorter than original_max_positions / high_freq_factor kept, longer
  than original_max_positions / low_freq_factor divided by `factor`, and a smooth blend between;
- yarn: frequencies that turn fewer than beta_slow times over the original length interpolated, more
  than beta_fast times kept, a linear ramp between, and the rotated values scaled by
  0.1 ln(factor) + 1 (so attention logits by its square), as transformers' "yarn" does.

Each equals transformers' rope_type of the same name (tests/model/test_rope.py), so a model trained
with one exports to and loads from Hugging Face Llama configs that carry it.
"""

from __future__ import annotations

import math

import torch

SCALINGS = ("none", "linear", "llama3", "yarn")


def rope_scaling_of(model_cfg) -> dict | None:
    """model.rope_scaling as a plain dict (what a module keeps), or None for plain RoPE."""
    scaling = getattr(model_cfg, "rope_scaling", None)
    if scaling is None or scaling.type == "none":
        return None
    return {key: getattr(scaling, key) for key in ("type", "factor", "original_max_positions", "low_freq_factor",
                                                    "high_freq_factor", "beta_fast", "beta_slow")}


def rope_frequencies(head_dim: int, theta: float, scaling=None, device=None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies (head_dim / 2,), fp32; the factor on the rotated values) for model.rope_scaling
    `scaling` (None or type "none": plain RoPE)."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    kind = "none" if scaling is None else scaling["type"]
    if kind == "none":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    original = float(scaling["original_max_positions"])
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv
        blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: long waves, 1: short
        return (1 - blend) * inv / factor + blend * inv, 1.0
    # yarn: the feature pairs that complete `turns` rotations over the original length, as a fractional index
    def pair_index(turns: float) -> float:
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))

    first = max(math.floor(pair_index(float(scaling["beta_fast"]))), 0)
    last = min(math.ceil(pair_index(float(scaling["beta_slow"]))), head_dim - 1)
    span = (last - first) or 0.001
    ramp = ((torch.arange(head_dim // 2, device=device, dtype=torch.float32) - first) / span).clamp(0.0, 1.0)
    # ramp 0 (fast pairs): the trained frequency; 1 (slow pairs): interpolated
    return inv * (1 - ramp) + inv / factor * ramp, (0.1 * math.log(factor) + 1.0) if factor > 1 else 1.0


def rope(x: torch.Tensor, position_ids: torch.Tensor, theta: float, scaling=None) -> torch.Tensor:
    """Rotate (B, S, H, D) by the angles of `position_ids` (S,) or (B, S); computed in fp32."""
    inv, gain = rope_frequencies(x.shape[-1], theta, scaling, device=x.device)
    ang = position_ids.to(device=x.device, dtype=torch.float32)[..., None] * inv  # (.., S, D/2)
    if ang.dim() == 2:
        ang = ang[None]
    cos, sin = ang.cos()[:, :, None], ang.sin()[:, :, None]
    if gain != 1.0:
        cos, sin = cos * gain, sin * gain
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)

"""Logit soft-capping (Gemma 2): x -> cap * tanh(x / cap), smooth and bounded by +-cap.

Used on attention scores (the reference backend; the Triton kernels compute the same in their tiles) and on
output logits (the chunked and vocabulary-parallel losses). Both need the derivative as well, for their
hand-written backward: d/dx cap tanh(x / cap) = 1 - tanh(x / cap)^2.
"""

from __future__ import annotations

import torch


def soft_cap(x: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cap * tanh(x / cap), its derivative 1 - tanh^2) in x's dtype."""
    t = torch.tanh(x / cap)
    return t * cap, 1 - t * t

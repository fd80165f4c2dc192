"""Evaluation of trained checkpoints: needle-in-a-haystack accuracy by length and depth (generation over
the context-parallel ranks), perplexity by position bucket on held-out token data."""

from .needle import needle_grid, write_needle
from .ppl import perplexity_by_position
from .weights import load_checkpoint_model

__all__ = ["load_checkpoint_model", "needle_grid", "perplexity_by_position", "write_needle"]

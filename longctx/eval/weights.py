"""A trained checkpoint as a plain model: its resolved config and its weights, on every rank."""

from __future__ import annotations

import os

from ..config import load
from ..model import build_model
from ..train.checkpoint import model_weights


def load_checkpoint_model(path: str, log=print):
    """(model, config) from a checkpoint or checkpoint root (its newest complete checkpoint)."""
    state, found = model_weights(path, log=log)
    cfg = load(path=os.path.join(found, "config.yaml"))
    model = build_model(cfg.model, seq_len=cfg.train.seq_len)
    model.load_state_dict(state)
    return model.eval(), cfg

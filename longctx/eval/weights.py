"""A trained checkpoint as a plain model: its resolved config and its weights, on every rank."""

from __future__ import annotations

import os

from ..config import load
from ..model import build_model
from ..train.checkpoint import model_weights


def load_checkpoint_model(path: str, log=print):
    """(model, config) from a checkpoint or checkpoint root (its newest complete checkpoint). A checkpoint of
    a Hugging Face Llama (model.hf_path) becomes longctx's Llama with its weights (generation needs it)."""
    state, found = model_weights(path, log=log)
    cfg = load(path=os.path.join(found, "config.yaml"))
    if cfg.model.hf_path:
        from ..model.hf import read_hf_config
        from ..model.hf_weights import llama_from_hf_state

        model, _ = llama_from_hf_state({k.removeprefix("hf."): v for k, v in state.items()},
                                       read_hf_config(cfg.model.hf_path), "the checkpoint's model.hf_path")
        return model.eval(), cfg
    model = build_model(cfg.model, seq_len=cfg.train.seq_len)
    model.load_state_dict(state)
    return model.eval(), cfg

"""A trained checkpoint as a plain model: its resolved config and its weights, on every rank."""

from __future__ import annotations

import os

from ..config import load
from ..model import build_model
from ..train.checkpoint import model_weights


def load_checkpoint_model(path: str, log=print):
    """(model, config) from a checkpoint or checkpoint root (its newest complete checkpoint). A checkpoint of
    a Hugging Face model (model.hf_path) is that architecture (from the directory it was trained from) with
    the checkpoint's weights, as an HFCausalLM whose attention runs on this process until a strategy is
    applied (generation and perplexity go through its own layers)."""
    state, found = model_weights(path, log=log)
    cfg = load(path=os.path.join(found, "config.yaml"))
    if cfg.model.hf_path:
        from ..model.hf import HFCausalLM, load_hf_model, prepare_attention

        hf = load_hf_model(cfg.model.hf_path)
        hf.load_state_dict({k.removeprefix("hf."): v for k, v in state.items()})
        prepare_attention(hf, "zigzag", None, None, cfg.parallel.kernel, cp=1)
        return HFCausalLM(hf).eval(), cfg
    model = build_model(cfg.model, seq_len=cfg.train.seq_len)
    model.load_state_dict(state)
    return model.eval(), cfg

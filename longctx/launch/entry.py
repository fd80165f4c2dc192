"""The one training entry every launcher runs: config in, summary out."""

from __future__ import annotations

from ..config import from_dict
from .env import process_group


def train_main(config: dict, config_path: str | None = None, steps: int | None = None) -> dict:
    """Run a resolved job config (a plain dict, so it pickles to harness ranks) in the process group this
    process finds; returns the training summary. `steps`: stop after that many steps (None: to train.steps)."""
    from ..train import Trainer

    cfg = from_dict(config)
    with process_group(cfg.parallel.timeout_s):
        return Trainer(cfg, config_path=config_path).fit(steps)


def eval_main(kind: str, params: dict, timeout_s: float = 600.0):
    """`longctx eval needle|ppl` in the process group this process finds (harness, torchrun, one process):
    every rank loads the checkpoint and takes part; rank 0's log lines are printed."""
    import torch.distributed as dist

    from ..eval import load_checkpoint_model, needle_grid, perplexity_by_position

    with process_group(timeout_s):
        rank0 = dist.get_rank() == 0
        log = print if rank0 else (lambda *a, **k: None)
        model, cfg = load_checkpoint_model(params["checkpoint"], log=log)
        if kind == "needle":
            return needle_grid(model, cfg, params["lengths"], params["depths"], samples=params["samples"],
                               strategy=params["strategy"], decode=params["decode"], log=log)
        return perplexity_by_position(model, params["data"] or cfg.data.path, seq_len=params["seq_len"] or
                                      cfg.train.seq_len, sequences=params["sequences"], buckets=params["buckets"],
                                      strategy=params["strategy"])

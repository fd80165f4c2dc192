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

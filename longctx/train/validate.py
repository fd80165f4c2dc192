"""The held-out loss during training (`validation.interval`).

Every `interval` optimizer steps, and after the last one, the trainer runs `validation.batches` held-out
batches forward only, through the same parallel model as training (context layout, tensor, pipeline and
data parallelism, FSDP2 or DeepSpeed), and logs the token-mean loss with the step's record (`val_loss`,
`val_ppl`, `val_tokens`). Each data rank reads its own slice of every batch, like training; the loss sum and
the count of real labels are summed over data x context ranks, so the number is the one a single process
gets for the same sequences, whatever the layout. The batches are the same each time (held-out sequences
0.., see data/sources.py), so the curve compares like with like. Nothing of training changes: no gradient,
no optimizer or data state, no random draw; the modules are put in eval mode for the pass and back after.
"""

from __future__ import annotations

import math

import torch

from ..data.loader import StepBatches
from ..data.sources import build_validation_source


class Validation:
    def __init__(self, trainer):
        cfg, t = trainer.cfg, trainer.cfg.train
        self.interval, self.n_batches = cfg.validation.interval, cfg.validation.batches
        source = build_validation_source(cfg.data, cfg.validation, seq_len=t.seq_len,
                                         vocab_size=cfg.model.vocab_size, seed=t.seed, batch_size=t.batch_size)
        self.batches = StepBatches(source, batch_size=t.batch_size, dp_rank=trainer.plan.dp_rank,
                                   dp_size=trainer.dims.dp, accumulation=t.accumulation)

    def due(self, step: int, last_step: int) -> bool:
        return bool(self.interval) and (step % self.interval == 0 or step == last_step)

    def run(self, trainer) -> dict:
        """{"val_loss", "val_ppl", "val_tokens"}: the same on every rank (collective)."""
        modules = trainer.plan.stages or [trainer.model]
        modes = [m.training for m in modules]
        loss_sum, count = 0.0, 0.0
        try:
            for m in modules:
                m.train(False)
            with torch.no_grad():
                for i in range(self.n_batches):
                    for shard in trainer.shard_batches(self.batches[i][1]):
                        loss_sum += trainer.forward_loss(shard)
                        count += shard["real_labels"]
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)
        plan = trainer.plan
        if trainer.pipeline is not None:  # only the last stage's ranks hold the loss
            (loss_sum,) = trainer._all_reduce([loss_sum], group=plan.pp_group)
        total, count = trainer._all_reduce([loss_sum, count], group=plan.loss_group)
        loss = total / count if count else float("nan")
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)), "val_tokens": int(count)}

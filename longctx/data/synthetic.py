"""Synthetic token sequences a small model can learn, generated from (seed, sequence index) alone.

Because every sequence is a function of its global index, the data of a config does not depend on the
layout: a data-parallel rank computes only the indices it reads, and any split of the global batch over
data ranks and accumulation steps sees the same sequences in the same optimizer step.

  induction  a random pattern of `period` tokens, repeated: after the first period every next token is
             predictable by looking `period` tokens back (what induction heads learn)
  copy       a random prompt (its length drawn per sequence, between a quarter and three quarters of the
             sequence), then the prompt again, repeated; with mask_prompt the prompt's labels are ignored
             (prompt-masked SFT: sequences differ in how many labels count, and whole context shards
             can hold no real label)
  random     independent uniform tokens (nothing to learn beyond the alphabet)
Tokens are drawn from the first `alphabet` ids of the vocabulary, so even before any long-range structure
is learnt the loss falls from ln(vocab) towards ln(alphabet).
"""

from __future__ import annotations

import numpy as np
import torch

from .labels import IGNORE_INDEX

TASKS = ("induction", "copy", "random")


class SyntheticSource:
    def __init__(self, *, task: str, seq_len: int, vocab_size: int, seed: int, alphabet: int = 16, period: int = 32,
                 mask_prompt: bool = True):
        if task not in TASKS:
            raise ValueError(f"data.task={task!r}: choose one of {', '.join(TASKS)}")
        if not 2 <= alphabet <= vocab_size:
            raise ValueError(f"data.alphabet={alphabet} must be between 2 and model.vocab_size={vocab_size}")
        if task == "induction" and not 1 <= period <= seq_len:
            raise ValueError(f"data.period={period} must be between 1 and train.seq_len={seq_len}")
        self.task, self.seq_len, self.seed = task, seq_len, seed
        self.alphabet, self.period, self.mask_prompt = alphabet, period, mask_prompt

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids (seq_len,), labels (seq_len,)): labels are the next tokens, shifted here in natural
        order, IGNORE_INDEX where there is nothing to learn from."""
        rng = np.random.default_rng([self.seed, index])
        n = self.seq_len + 1
        if self.task == "induction":
            pattern = rng.integers(0, self.alphabet, self.period)
            tokens = np.resize(pattern, n)
        elif self.task == "copy":
            prompt_len = int(rng.integers(n // 4 + 1, max(n // 4 + 2, 3 * n // 4 + 1)))
            tokens = np.resize(rng.integers(0, self.alphabet, prompt_len), n)
        else:
            tokens = rng.integers(0, self.alphabet, n)
        tokens = torch.from_numpy(tokens.astype(np.int64))
        inputs, labels = tokens[:-1].clone(), tokens[1:].clone()
        if self.task == "copy" and self.mask_prompt:
            labels[: prompt_len - 1] = IGNORE_INDEX  # targets inside the prompt cannot be predicted
        return inputs, labels

    def batch(self, indices) -> dict:
        """{input_ids, labels}, each (len(indices), seq_len)."""
        pairs = [self.sequence(int(i)) for i in indices]
        return {"input_ids": torch.stack([p[0] for p in pairs]), "labels": torch.stack([p[1] for p in pairs])}


def step_indices(step: int, *, batch_size: int, dp_rank: int, dp_size: int, accumulation: int, micro: int,
                 first_step: int = 0, first_sequence: int = 0) -> range:
    """Global sequence indices read by data rank `dp_rank` in micro-batch `micro` of optimizer step `step`:
    the step's batch_size sequences are cut into dp_size contiguous slices, each into `accumulation` parts.
    Step `first_step` starts at sequence `first_sequence` (a run resumed with another batch size continues
    where the checkpoint's stopped)."""
    per_rank = batch_size // dp_size
    per_micro = per_rank // accumulation
    start = first_sequence + (step - first_step) * batch_size + dp_rank * per_rank + micro * per_micro
    return range(start, start + per_micro)

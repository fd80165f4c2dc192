"""Synthetic long-context retrieval tasks: passkey, needle-in-a-haystack, multi-key associative recall.

Every example is a function of (seed, index) alone, like the other synthetic data, and is written in a
small symbol table at the bottom of the vocabulary, so a tiny model can learn it without a tokenizer:

  0-9   digits (the values to retrieve)     10 KEY   11 QUERY   12 SEP
  13-28 key symbols (which fact is asked)    32-   filler ("haystack"), `alphabet` ids

A fact is `KEY k SEP d1 .. dn`; the sequence ends with the question `QUERY k SEP` and its answer
`d1 .. dn`, and only the answer's digits carry labels. passkey: one fact at a random depth; needle: one
fact at depth `depth` (fraction of the haystack before it; None = random); recall: `pairs` facts with
distinct keys at random places, one of them asked. Accuracy is exact match of the answer's digits. The
haystack is random filler, or (haystack="repeat") a random pattern of 16-64 tokens repeated, whose many
look-alike n-grams train retrieval to match the fact exactly (it generalises to random filler).
"""

from __future__ import annotations

import numpy as np
import torch

from .labels import IGNORE_INDEX

RETRIEVAL = ("passkey", "needle", "recall")
HAYSTACKS = ("random", "repeat")
KEY, QUERY, SEP = 10, 11, 12
KEYS_BASE, N_KEYS = 13, 16
FILLER_BASE = 32


def min_vocab(alphabet: int) -> int:
    return FILLER_BASE + alphabet


class RetrievalTask:
    def __init__(self, *, kind: str, seq_len: int, vocab_size: int, seed: int, alphabet: int = 16, digits: int = 4,
                 depth: float | None = None, pairs: int = 4, pack_min: int = 0, haystack: str = "random"):
        if kind not in RETRIEVAL:
            raise ValueError(f"data.source={kind!r}: retrieval tasks are {', '.join(RETRIEVAL)}")
        if isinstance(alphabet, bool) or not isinstance(alphabet, int) or alphabet < 1:
            raise ValueError(f"data.alphabet={alphabet!r} must be a positive int (the number of filler symbols)")
        if vocab_size < min_vocab(alphabet):
            raise ValueError(f"model.vocab_size={vocab_size} is too small for data.source={kind} with data.alphabet="
                             f"{alphabet}: it needs at least {min_vocab(alphabet)} (the task's symbols + filler)")
        if depth is not None and not 0.0 <= depth <= 1.0:
            raise ValueError(f"data.depth={depth} must be between 0 and 1 (fraction of the haystack before the "
                             "needle), or null for random depths")
        if haystack not in HAYSTACKS:
            raise ValueError(f"data.haystack={haystack!r}: choose one of {', '.join(HAYSTACKS)}")
        if not 1 <= digits <= 32:
            raise ValueError(f"data.digits={digits} must be between 1 and 32")
        n_facts = pairs if kind == "recall" else 1
        if not 1 <= n_facts <= N_KEYS:
            raise ValueError(f"data.pairs={pairs} must be between 1 and {N_KEYS} (distinct key symbols)")
        self.kind, self.seq_len, self.seed, self.alphabet = kind, seq_len, seed, alphabet
        self.digits, self.depth, self.n_facts = digits, depth, n_facts
        self.pack_min, self.haystack = pack_min, haystack
        need = (3 + digits) * (n_facts + 1) + 1
        if seq_len + 1 < need:
            raise ValueError(f"train.seq_len={seq_len} is too short for data.source={kind}: it needs at least "
                             f"{need - 1} tokens for its facts and question")
        if pack_min and not need - 1 <= pack_min <= seq_len:
            raise ValueError(f"data.pack_min={pack_min} must be between {need - 1} (the shortest example) and "
                             f"train.seq_len={seq_len}, or 0 (one example per sequence)")

    def example(self, index, length: int | None = None, depth: float | None = None) -> tuple[np.ndarray, int]:
        """(tokens of length+1, answer start): the answer is tokens[start:]. `index`: an int or a tuple."""
        n = (length or self.seq_len) + 1
        rng = np.random.default_rng([self.seed, *(index if isinstance(index, tuple) else (index,))])
        fact_len = 3 + self.digits
        keys = rng.choice(N_KEYS, size=self.n_facts, replace=False) + KEYS_BASE
        values = rng.integers(0, 10, size=(self.n_facts, self.digits))
        asked = int(rng.integers(self.n_facts))
        if self.haystack == "repeat":  # a random pattern of 16-64 tokens repeated: a haystack full of look-alikes
            tokens = FILLER_BASE + np.resize(rng.integers(0, self.alphabet, size=int(rng.integers(16, 65))), n)
        else:
            tokens = FILLER_BASE + rng.integers(0, self.alphabet, size=n)
        hay = n - fact_len  # the question and its answer close the sequence
        if self.n_facts == 1:
            d = depth if depth is not None else self.depth if self.depth is not None else float(rng.random())
            starts = [int(round(d * (hay - fact_len)))]
        elif depth is not None:  # recall evaluated by depth: the asked fact there, the others around it
            starts, asked = _around(int(round(depth * (hay - fact_len))), self.n_facts, fact_len, hay, rng)
        else:  # distinct non-overlapping slots
            slots = (hay - fact_len * self.n_facts) + self.n_facts
            picks = np.sort(rng.choice(slots, size=self.n_facts, replace=False))
            starts = [int(p) + i * (fact_len - 1) for i, p in enumerate(picks)]
        for s, key, value in zip(starts, keys, values):
            tokens[s:s + fact_len] = [KEY, key, SEP, *value]
        tokens[hay:] = [QUERY, keys[asked], SEP, *values[asked]]
        return tokens.astype(np.int64), n - self.digits

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._labelled(index, self.seq_len)

    def packed(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Examples of random lengths in [pack_min, seq_len] packed as documents into one sequence (short
        ones are learnt first; every example's answer carries labels): (inputs, labels, doc ids)."""
        # a stream no example draws from: example j of this sequence has [seed, index, j] (with this one, example
        # 1's key would follow the lengths); the tag ends non-zero as numpy's seeding ignores trailing zero words
        rng = np.random.default_rng([self.seed, index, 0, 1])
        lengths, left = [], self.seq_len
        while left:
            n = int(rng.integers(self.pack_min, self.seq_len + 1))
            n = left if left - n < self.pack_min else min(n, left)
            lengths.append(n)
            left -= n
        parts = [self._labelled((index, j), n) for j, n in enumerate(lengths)]
        doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), doc

    def _labelled(self, index, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, start = self.example(index, length)
        tokens = torch.from_numpy(tokens)
        labels = torch.full((length,), IGNORE_INDEX, dtype=torch.long)
        labels[start - 1:] = tokens[start:]  # labels[t] is the token after t: only the answer counts
        return tokens[:-1].clone(), labels

    def batch(self, indices) -> dict:
        if self.pack_min:
            parts = [self.packed(int(i)) for i in indices]
            return {"input_ids": torch.stack([p[0] for p in parts]), "labels": torch.stack([p[1] for p in parts]),
                    "doc_ids": torch.stack([p[2] for p in parts])}
        pairs = [self.sequence(int(i)) for i in indices]
        return {"input_ids": torch.stack([p[0] for p in pairs]), "labels": torch.stack([p[1] for p in pairs])}

    def prompt(self, index: int, length: int, depth: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt, answer) for evaluation: a `length`-token example cut before its answer."""
        tokens, start = self.example(index, length, depth)
        return torch.from_numpy(tokens[:start]), torch.from_numpy(tokens[start:])


def _around(target: int, n_facts: int, fact_len: int, hay: int, rng) -> tuple[list[int], int]:
    """(starts of `n_facts` non-overlapping facts in `hay` tokens, index of the one at `target`): the facts are
    laid out as free space and blocks (a block's start is its offset in the free space plus the blocks before
    it); the asked one has k others before it (drawn among the k that can put it at `target`, or the nearest
    start where the space is too tight), and the others' offsets are drawn on its either side."""
    free = hay - n_facts * fact_len
    fits = [k for k in range(n_facts) if 0 <= target - k * fact_len <= free]
    before = int(rng.choice(fits)) if fits else min(n_facts - 1, max(0, round((target - free) / fact_len)))
    offset = min(free, max(0, target - before * fact_len))
    left = np.sort(rng.integers(0, offset + 1, size=before))
    right = np.sort(rng.integers(offset, free + 1, size=n_facts - 1 - before))
    offsets = [*left.tolist(), offset, *right.tolist()]
    return [int(c) + i * fact_len for i, c in enumerate(offsets)], before

"""Prepared token datasets (`longctx data prepare`) read as packed training sequences.

A prepared directory holds `tokens.bin` (every document's tokens, concatenated; uint16 or uint32),
`offsets.npy` (int64, where each document starts, then the total) and `meta.json` (tokenizer, counts).
Packing is by stream: the concatenated documents are cut into consecutive seq_len windows, so every token
is an input exactly once per epoch (the last window is padded), and each window keeps its document
boundaries: document ids per token, labels ignored where the next token belongs to another document
(a document's last token does not predict the next document), RoPE restarting per document downstream.

Like the synthetic sources, a sequence is a function of its global index: epoch e reads the windows in a
permutation seeded by (seed, e), so any data-parallel split and any resume step read the same sequences,
and the loader's position is just the number of sequences consumed (the optimizer step).
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from .labels import IGNORE_INDEX

FILES = ("tokens.bin", "offsets.npy", "meta.json")


def read_meta(path: str, what: str = "data.path") -> dict:
    """`what` names the argument that gave `path` in the errors (data.path, --data)."""
    missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{what}={path!r} is not a prepared dataset (missing {', '.join(missing)}); "
                                "make one with: longctx data prepare --input FILES --output DIR")
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


class TokenSource:
    def __init__(self, path: str, *, seq_len: int, seed: int, vocab_size: int, shuffle: bool = True,
                 what: str = "data.path"):
        self.path, self.seq_len, self.seed, self.shuffle = path, seq_len, seed, shuffle
        self.meta = read_meta(path, what)
        if self.meta["vocab_size"] > vocab_size:
            raise ValueError(f"{what}={path!r} was tokenized with a vocabulary of {self.meta['vocab_size']} ids, "
                             f"more than model.vocab_size={vocab_size}; raise model.vocab_size to at least "
                             f"{self.meta['vocab_size']}")
        self.n_tokens = int(self.meta["tokens"])
        if self.n_tokens < 2:
            raise ValueError(f"{what}={path!r} holds {self.n_tokens} tokens: nothing to train on")
        self.pad_id = int(self.meta.get("pad_id", 0))
        # windows of seq_len inputs; their labels reach one token further (the last window is padded)
        self.n_sequences = -(-(self.n_tokens - 1) // seq_len)
        self._tokens = self._offsets = None  # opened lazily: memmaps do not travel to DataLoader workers
        self._perm = None  # (epoch, its window permutation)

    def _open(self):
        if self._tokens is None:
            self._tokens = np.memmap(os.path.join(self.path, "tokens.bin"), dtype=self.meta["dtype"], mode="r")
            self._offsets = np.load(os.path.join(self.path, "offsets.npy"))
        return self._tokens, self._offsets

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokens"] = state["_offsets"] = state["_perm"] = None
        return state

    def window(self, index: int) -> int:
        """Which seq_len window of the stream global sequence `index` reads."""
        epoch, i = divmod(int(index), self.n_sequences)
        if not self.shuffle:
            return i
        if self._perm is None or self._perm[0] != epoch:  # one permutation per epoch, not one per sequence
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences))
        return int(self._perm[1][i])

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, offsets = self._open()
        a = self.window(index) * self.seq_len
        b = min(a + self.seq_len + 1, self.n_tokens)
        chunk = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        chunk[: b - a] = tokens[a:b]
        doc = np.searchsorted(offsets, np.arange(a, a + self.seq_len + 1), side="right") - 1
        labels = chunk[1:].copy()
        labels[doc[1:] != doc[:-1]] = IGNORE_INDEX  # no prediction across a document boundary
        labels[max(0, b - a - 1):] = IGNORE_INDEX  # padding past the end of the data
        doc_ids = doc[:-1] - doc[0]
        return torch.from_numpy(chunk[:-1]), torch.from_numpy(labels), torch.from_numpy(doc_ids)

    def batch(self, indices) -> dict:
        parts = [self.sequence(int(i)) for i in indices]
        return {"input_ids": torch.stack([p[0] for p in parts]), "labels": torch.stack([p[1] for p in parts]),
                "doc_ids": torch.stack([p[2] for p in parts])}

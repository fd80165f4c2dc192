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

import copy
import json
import os

import numpy as np
import torch

from .._messages import first_line
from .labels import IGNORE_INDEX

FILES = ("tokens.bin", "offsets.npy", "meta.json")
META_KEYS = ("tokens", "dtype", "vocab_size")  # what TokenSource reads from meta.json
DTYPES = ("uint16", "uint32")


def read_meta(path: str, what: str = "data.path") -> dict:
    """`what` names the argument that gave `path` in the errors (data.path, --data)."""
    missing = [f for f in FILES if not os.path.exists(os.path.join(path, f))]
    if missing:
        raise FileNotFoundError(f"{what}={path!r} is not a prepared dataset (missing {', '.join(missing)}); "
                                "make one with: longctx data prepare --input FILES --output DIR")
    again = f"prepare the dataset again with: longctx data prepare --input FILES --output {path}"
    try:
        with open(os.path.join(path, "meta.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        first = first_line(e)
        raise ValueError(f"{what}={path!r}: meta.json is not valid JSON ({first}): {again}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{what}={path!r}: meta.json holds a {type(meta).__name__}, not the dataset's summary "
                         f"object: {again}")
    missing = [k for k in META_KEYS if k not in meta]
    if missing:
        raise ValueError(f"{what}={path!r}: meta.json lacks {', '.join(missing)}: {again}")
    for key in ("tokens", "vocab_size"):
        if isinstance(meta[key], bool) or not isinstance(meta[key], int) or meta[key] < 0:
            raise ValueError(f"{what}={path!r}: meta.json's {key}={meta[key]!r} is not a count: {again}")
    if meta["dtype"] not in DTYPES:
        raise ValueError(f"{what}={path!r}: meta.json's dtype={meta['dtype']!r} is not one of "
                         f"{', '.join(DTYPES)}: {again}")
    return meta


def tokenizer_of(meta: dict) -> str | None:
    """What identifies a prepared dataset's tokenizer: its tokenizer.json's digest (the byte tokenizer has only
    a name). Ids of another tokenizer mean other text."""
    return meta.get("tokenizer_sha256") or meta.get("tokenizer")


def identity(meta: dict) -> dict:
    """What changes when a dataset is prepared again from other input (its windows then differ): the counts
    and the tokenizer, cheap to compare on every resume."""
    return {"tokens": meta.get("tokens"), "documents": meta.get("documents"), "tokenizer": tokenizer_of(meta)}


class TokenSource:
    def __init__(self, path: str, *, seq_len: int, seed: int, vocab_size: int, shuffle: bool = True,
                 what: str = "data.path"):
        self.path, self.seq_len, self.seed, self.shuffle = path, seq_len, seed, shuffle
        self.meta = read_meta(path, what)
        if self.meta["vocab_size"] > vocab_size:
            training = what.startswith(("data.", "validation."))  # else a trained checkpoint's evaluation
            fix = (f"raise model.vocab_size to at least {self.meta['vocab_size']}" if training
                   else "use data prepared with the tokenizer this model was trained with")
            raise ValueError(f"{what}={path!r} was tokenized with a vocabulary of {self.meta['vocab_size']} ids, "
                             f"more than the model's {vocab_size} (model.vocab_size); {fix}")
        self.n_tokens = int(self.meta["tokens"])
        if self.n_tokens < 2:
            raise ValueError(f"{what}={path!r} holds {self.n_tokens} tokens: nothing to train on")
        if self.n_tokens <= seq_len:  # one window would be mostly padding, counted as tokens trained on
            raise ValueError(f"{what}={path!r} holds {self.n_tokens:,} tokens, not one window of {seq_len:,} tokens "
                             "and the label after it; use a sequence length below "
                             f"{self.n_tokens:,} or prepare more data")
        self._check_files(what)
        self.pad_id = int(self.meta.get("pad_id", 0))
        # windows of seq_len inputs; their labels reach one token further (the last window is padded)
        self.total_windows = -(-(self.n_tokens - 1) // seq_len)
        self.first_window, self.n_sequences = 0, self.total_windows
        self.end_token = self.n_tokens  # what this source may read: a training split stops where held-out begins
        self._tokens = self._offsets = None  # opened lazily: memmaps do not travel to DataLoader workers
        self._perm = None  # (epoch, its window permutation)

    def restricted(self, first: int, stop: int, *, shuffle: bool | None = None) -> TokenSource:
        """The same dataset (nothing read again) reading only windows first..stop-1: a held-out split is the
        last windows, training the ones before them. `shuffle`: None keeps this source's."""
        if not 0 <= first < stop <= self.total_windows:
            raise ValueError(f"{self.path!r} holds {self.total_windows} windows of {self.seq_len} tokens; windows "
                             f"{first}..{stop - 1} are not among them")
        out = copy.copy(self)
        out.first_window, out.n_sequences, out._perm = first, stop - first, None
        # the last window's last label would be the first held-out token: a split reads nothing past its windows
        out.end_token = min(stop * self.seq_len, self.n_tokens)
        out.shuffle = self.shuffle if shuffle is None else shuffle
        return out

    def _check_files(self, what: str) -> None:
        """tokens.bin and offsets.npy agree with meta.json (cheap: a size and a memory-mapped last offset), so a
        truncated or swapped file is an error here, not a broadcast failure inside a rank."""
        path, n, dtype = self.path, self.n_tokens, self.meta["dtype"]
        again = f"prepare the dataset again with: longctx data prepare --input FILES --output {path}"
        tokens_bin = os.path.join(path, "tokens.bin")
        size, expected = os.path.getsize(tokens_bin), n * np.dtype(dtype).itemsize
        if size != expected:
            raise ValueError(f"{what}={path!r}: {tokens_bin} holds {size:,} bytes but meta.json says {n:,} {dtype} "
                             f"tokens ({expected:,} bytes): a truncated or wrong file; {again}")
        offsets_npy = os.path.join(path, "offsets.npy")
        try:
            offsets = np.load(offsets_npy, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            first = first_line(e)
            raise ValueError(f"{what}={path!r}: {offsets_npy} is not a readable .npy array ({first}); "
                             f"{again}") from None
        if offsets.ndim != 1 or offsets.size < 2 or not np.issubdtype(offsets.dtype, np.integer):
            raise ValueError(f"{what}={path!r}: {offsets_npy} is not a list of document offsets (shape "
                             f"{offsets.shape}, {offsets.dtype}); {again}")
        if int(offsets[0]) != 0 or int(offsets[-1]) != n:  # document starts, then the total
            raise ValueError(f"{what}={path!r}: {offsets_npy} spans tokens {int(offsets[0])}..{int(offsets[-1])} but "
                             f"meta.json says {n:,} tokens: a truncated or wrong file; {again}")

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
            return self.first_window + i
        if self._perm is None or self._perm[0] != epoch:  # one permutation per epoch, not one per sequence
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_sequences))
        return self.first_window + int(self._perm[1][i])

    def sequence(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tokens, offsets = self._open()
        a = self.window(index) * self.seq_len
        b = min(a + self.seq_len + 1, self.end_token)
        chunk = np.full(self.seq_len + 1, self.pad_id, dtype=np.int64)
        chunk[: b - a] = tokens[a:b]
        doc = np.searchsorted(offsets, np.arange(a, a + self.seq_len + 1), side="right") - 1
        labels = chunk[1:].copy()
        labels[doc[1:] != doc[:-1]] = IGNORE_INDEX  # no prediction across a document boundary
        labels[max(0, b - a - 1):] = IGNORE_INDEX  # padding past the end of the data (or of a training split)
        doc_ids = doc[:-1] - doc[0]
        return torch.from_numpy(chunk[:-1]), torch.from_numpy(labels), torch.from_numpy(doc_ids)

    def batch(self, indices) -> dict:
        parts = [self.sequence(int(i)) for i in indices]
        return {"input_ids": torch.stack([p[0] for p in parts]), "labels": torch.stack([p[1] for p in parts]),
                "doc_ids": torch.stack([p[2] for p in parts])}

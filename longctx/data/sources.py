"""The one place a config's `data` section becomes a source: synthetic | tokens | passkey | needle | recall.

A source maps global sequence indices to a batch dict (input_ids, labels and, for packed token data,
doc_ids), each sequence a function of its index, so every layout and data-parallel split reads the same
data and resuming needs only the step.
"""

from __future__ import annotations

from .synthetic import SyntheticSource
from .tasks import RETRIEVAL, RetrievalTask
from .tokens import TokenSource

SOURCES = ("synthetic", "tokens", *RETRIEVAL)


def build_source(data, *, seq_len: int, vocab_size: int, seed: int):
    """`data`: the config's data section. ValueError (naming the key) for anything it cannot serve."""
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r}: choose one of {', '.join(SOURCES)}")
    if data.source == "synthetic":
        return SyntheticSource(task=data.task, seq_len=seq_len, vocab_size=vocab_size, seed=seed,
                               alphabet=data.alphabet, period=data.period, mask_prompt=data.mask_prompt)
    if data.source == "tokens":
        if not data.path:
            raise ValueError("data.source=tokens needs data.path=DIR (a directory made by longctx data prepare)")
        return TokenSource(data.path, seq_len=seq_len, seed=seed, vocab_size=vocab_size, shuffle=data.shuffle)
    return RetrievalTask(kind=data.source, seq_len=seq_len, vocab_size=vocab_size, seed=seed, alphabet=data.alphabet,
                         digits=data.digits, depth=data.depth, pairs=data.pairs, pack_min=data.pack_min,
                         haystack=data.haystack)

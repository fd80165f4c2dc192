"""Perplexity by position bucket on held-out token data: does the model use its context?

Sequences are packed windows of a prepared dataset (document boundaries kept, so a position is the
token's position inside its document). Every rank of the process group holds a context shard of each
sequence (the strategy's layout); per-token losses are summed into equal-width position buckets and
all-reduced, so the numbers do not depend on how many ranks ran it.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.labels import IGNORE_INDEX
from ..data.tokens import TokenSource
from ..model.parallelize import apply_context_parallel
from ..parallel.sequence.documents import Documents
from ..parallel.sequence.registry import get_strategy


@torch.no_grad()
def perplexity_by_position(model, data_path: str, *, seq_len: int, sequences: int = 8, buckets: int = 8,
                           strategy: str = "zigzag", batch: int = 2, first: int = 0) -> list[dict]:
    """[{bucket_start, bucket_end, tokens, loss, ppl}], positions inside documents, over `sequences` windows
    read in order from window `first` (no shuffling: held-out data is read as it lies)."""
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    src = check_ppl(data_path, seq_len=seq_len, sequences=sequences, buckets=buckets, strategy=strategy, world=world,
                    vocab_size=model.cfg.vocab_size, first=first)
    layout = get_strategy(strategy).layout()
    if world > 1:
        apply_context_parallel(model, strategy)
    pos = get_strategy(strategy).rank_positions(layout, seq_len, world, rank) if world > 1 else torch.arange(seq_len)
    width = math.ceil(seq_len / buckets)
    sums = torch.zeros(buckets, dtype=torch.float64)
    counts = torch.zeros(buckets, dtype=torch.float64)
    n = min(sequences, src.n_sequences - first)
    for start in range(first, first + n, batch):
        b = src.batch(range(start, min(first + n, start + batch)))
        docs = Documents.from_ids(b["doc_ids"])
        logits = model(b["input_ids"][:, pos], pos, documents=docs)
        labels = b["labels"][:, pos]
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none",
                               ignore_index=IGNORE_INDEX).view_as(labels).double()
        where = (docs.rope_positions(pos) // width).clamp(max=buckets - 1).expand_as(labels)
        ok = labels != IGNORE_INDEX
        sums.index_add_(0, where[ok], loss[ok])
        counts.index_add_(0, where[ok], torch.ones_like(loss[ok]))
    if world > 1:
        both = torch.stack([sums, counts])
        dist.all_reduce(both)
        sums, counts = both
    out = []
    for i in range(buckets):
        mean = float(sums[i] / counts[i]) if counts[i] else float("nan")
        out.append({"bucket_start": i * width, "bucket_end": min(seq_len, (i + 1) * width), "tokens": int(counts[i]),
                    "loss": mean, "ppl": math.exp(mean) if counts[i] else float("nan")})
    return out


def check_ppl(data_path: str | None, *, seq_len: int, sequences: int, buckets: int, strategy: str, world: int,
              vocab_size: int, first: int = 0) -> TokenSource:
    """Every argument of perplexity_by_position that can be wrong, checked without a model (the launching
    process calls it, so a bad --data is one line rather than a traceback from every rank)."""
    if not data_path:
        raise ValueError("--data is needed: the checkpoint's config has no data.path (it trained on synthetic "
                         "data); pass a dataset made by `longctx data prepare`")
    if buckets < 1 or sequences < 1 or seq_len < buckets:
        raise ValueError("--buckets and --sequences must be >= 1, and --seq-len at least the bucket count")
    try:
        src = TokenSource(data_path, seq_len=seq_len, seed=0, vocab_size=vocab_size, shuffle=False, what="--data")
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if world > 1:
        get_strategy(strategy).check(seq_len=seq_len, world=world, layout=get_strategy(strategy).layout(),
                                     what="--seq-len")
    if src.n_sequences - first < 1:
        raise ValueError(f"the dataset has {src.n_sequences} windows of {seq_len} tokens; nothing from window {first}")
    return src

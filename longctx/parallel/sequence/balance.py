"""Balancing packed documents over the context ranks by reordering them inside each sequence.

With documents packed, a rank's attention work is the keys its queries see inside their own documents, so
a layout balanced for one document (zigzag) can be far off for a packed batch: a long document whose
causal triangle falls mostly on a few ranks. Attention never crosses a document and RoPE restarts at
each, so the order of the documents inside a sequence changes no output, no loss and no gradient (only
the order of float additions): the planner is free to pick the order. `balanced_order` tries a few
candidate orders (as given, by length, long documents at the two ends or in the middle, seeded shuffles)
and keeps the one whose busiest rank has the least work, counted per rank from positions alone.
"""

from __future__ import annotations

import numpy as np
import torch

from .documents import Documents
from .layouts import positions


def rank_work(lengths, layout: str, world: int, causal: bool = True, window: int | None = None) -> np.ndarray:
    """Pairs each rank's queries see (per batch element and head) for documents of `lengths` in this order."""
    starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    ends = np.repeat(np.cumsum(lengths), lengths)
    p = np.arange(len(starts))
    seen = (p - starts + 1) if causal else (ends - starts)
    if window is not None:
        seen = np.minimum(seen, window) if causal else np.minimum(ends, p + window) - np.maximum(starts, p - window + 1)
    n = len(starts)
    return np.array([seen[positions(layout, n, world, r).numpy()].sum() for r in range(world)])


def imbalance_of(work: np.ndarray) -> float:
    return float(work.max() / work.mean()) if work.sum() else 1.0


def _candidates(lengths: list[int], seed: int, shuffles: int):
    n = len(lengths)
    yield list(range(n))
    by_len = sorted(range(n), key=lambda i: -lengths[i])
    yield by_len
    front, back = [], []
    for j, i in enumerate(by_len):  # longest documents alternate between the two ends, short ones meet inside
        (front if j % 2 == 0 else back).append(i)
    yield front + back[::-1]
    left, right = [], []
    for j, i in enumerate(by_len[1:]):  # the longest in the middle (zigzag pairs mirror-image chunks), the
        (left if j % 2 == 0 else right).append(i)  # rest alternating outwards
    yield left[::-1] + by_len[:1] + right
    rng = np.random.default_rng(seed)
    for _ in range(shuffles):
        yield list(rng.permutation(n))


def balanced_order(lengths, layout: str, world: int, *, causal: bool = True, window: int | None = None,
                   seed: int = 0, shuffles: int = 8) -> tuple[list[int], float, float]:
    """(document order, imbalance as given, imbalance of that order): max/mean of per-rank work."""
    lengths = [int(x) for x in lengths]
    given = imbalance_of(rank_work(lengths, layout, world, causal, window))
    best, best_imb = list(range(len(lengths))), given
    if len(lengths) > 1:
        for order in _candidates(lengths, seed, shuffles):
            imb = imbalance_of(rank_work([lengths[i] for i in order], layout, world, causal, window))
            if imb < best_imb - 1e-12:
                best, best_imb = [int(i) for i in order], imb
    return best, given, best_imb


def reorder_documents(doc_ids: torch.Tensor, layout: str, world: int, *tensors, causal: bool = True,
                      window: int | None = None, seed: int = 0):
    """Reorder each row's documents (maximal runs of doc_ids) for balance; the same column permutation
    is applied to every tensor given (input ids, labels, ...). Returns (doc_ids, *tensors) reordered."""
    out = [doc_ids.clone(), *(t.clone() for t in tensors)]
    docs = Documents.from_ids(doc_ids)
    for b in range(doc_ids.shape[0]):
        starts, lengths = docs.starts[b], docs.lengths(b)
        ends = [s + n for s, n in zip(starts, lengths)]
        order, _, _ = balanced_order(lengths, layout, world, causal=causal, window=window, seed=seed + b)
        if order == list(range(len(lengths))):
            continue
        cols = torch.cat([torch.arange(starts[i], ends[i]) for i in order])
        new_ids = torch.repeat_interleave(torch.arange(len(order)), torch.tensor([lengths[i] for i in order]))
        out[0][b] = new_ids.to(doc_ids.dtype)
        for t_out, t in zip(out[1:], tensors):
            t_out[b] = t[b, cols]
    return tuple(out)

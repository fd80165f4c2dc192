"""Balancing packed documents: reordering never changes what attention computes, and lowers counted work."""

import numpy as np
import torch

from longctx.launch import run
from longctx.parallel.sequence.balance import balanced_order, rank_work, reorder_documents
from tests.support.equivalence import packed_equivalence


def _hand_rank_work(lengths, positions_of_rank):
    """Causal pairs of a rank's queries: position p of a document starting at s sees p - s + 1 keys."""
    starts = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    return sum(p - starts[p] + 1 for p in positions_of_rank)


def test_rank_work_matches_a_hand_count():
    lengths = [10, 3, 1, 18]
    n, world = 32, 4
    for layout, pos in (("contiguous", lambda r: range(r * 8, r * 8 + 8)),
                        ("striped", lambda r: range(r, n, world)),
                        ("zigzag", lambda r: [*range(r * 4, r * 4 + 4), *range((7 - r) * 4, (8 - r) * 4)])):
        assert rank_work(lengths, layout, world).tolist() == [_hand_rank_work(lengths, pos(r)) for r in range(4)]


def test_balancing_lowers_the_busiest_rank_and_keeps_every_token():
    lengths = [200, 8, 8, 8, 8, 8, 8, 8]  # one long document first: contiguous puts its triangle on few ranks
    order, given, balanced = balanced_order(lengths, "contiguous", 4)
    assert balanced < given and sorted(order) == list(range(len(lengths)))
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    tokens = torch.arange(doc_ids.shape[1])[None]
    new_ids, new_tokens = reorder_documents(doc_ids, "contiguous", 4, tokens)
    assert sorted(new_tokens[0].tolist()) == tokens[0].tolist()
    for d in new_ids[0].unique():  # each document's tokens stay together and in order
        run_ = new_tokens[0][new_ids[0] == d]
        assert torch.equal(run_, torch.arange(int(run_[0]), int(run_[0]) + run_.numel()))


def test_balanced_model_equals_per_document_model():
    """Reordered documents: the logits come in another order, but every gradient is the per-document one."""
    lengths = [[20, 2, 2, 2, 2, 2, 1, 1]]
    for _, err_grads, starts in run(packed_equivalence, 4, args=(["parallel.strategy=ring",
                                                                   "parallel.balance_documents=true"], lengths),
                                    timeout=120):
        assert starts != ((0, 20, 22, 24, 26, 28, 30, 31),)  # the planner did reorder
        assert max(err_grads.values()) <= 1e-10, err_grads

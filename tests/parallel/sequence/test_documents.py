"""Packed documents through every schedule: attention never crosses a document boundary.

Each case packs documents that straddle rank boundaries, single-token documents and (in another row of the
batch) one document filling the whole sequence. The parallel result is compared with every document
attended on its own by the fp64 oracle (fp32 <= 1e-5, outputs and grads), and the work each rank did (as
recorded by the schedule and as counted by the `counting` kernel) with a closed form written here from
positions and document lengths alone: a query at position p of a document starting at s sees p - s + 1
keys (causal), min(p - s + 1, w) (causal window w) or the document's length (not causal)."""

import pytest
import torch

from longctx.launch import run
from longctx.parallel import Documents

from ._doc_workers import run_cases


def _hand_positions(layout, n, world, rank):
    c = n // world
    if layout == "contiguous":
        return list(range(rank * c, (rank + 1) * c))
    if layout == "striped":
        return list(range(rank, n, world))
    h = c // 2
    return list(range(rank * h, (rank + 1) * h)) + list(range((2 * world - 1 - rank) * h, (2 * world - rank) * h))


def _keys_seen(p, lengths, causal, window):
    start = 0
    for length in lengths:
        if p < start + length:
            if not causal:
                return length if window is None else min(length, p + window) - max(start, p - window + 1)
            seen = p - start + 1
            return seen if window is None else min(seen, window)
        start += length
    raise AssertionError(p)


def _hand_work(case, world, rank):
    """Pairs x heads this rank computes in one pass, from positions and document lengths only."""
    n, h = sum(case["lengths"][0]), case["h"]
    s = case["strategy"]
    if s == "ulysses":
        queries, heads = list(range(n)), h // world
    elif s == "hybrid":
        ring, uly = case["mesh"]
        queries, heads = _hand_positions(case["layout"], n, ring, rank // uly), h // uly
    else:
        layout = case.get("layout") or {"ring": "contiguous", "striped": "striped"}.get(s, "zigzag")
        queries, heads = _hand_positions(layout, n, world, rank), h
    return heads * sum(_keys_seen(p, row, case["causal"], case.get("window"))
                       for row in case["lengths"] for p in queries)


def _packings(n):
    mixed = [n // 4 - 1, 1, n // 2 - 1, 1, 1, n - (n // 4 + n // 2 + 1)]  # straddlers and single tokens
    return [[mixed, [n]], [[1] * 3 + [n - 3]] * 2]


def _cases(world):
    n = 8 * world
    h = 2 * world if world < 4 else world
    cases = []
    for lengths in _packings(n):
        for causal, window in ((True, None), (False, None), (True, 3)):
            for s in ("ring", "zigzag", "striped", "ulysses"):
                cases.append(dict(strategy=s, lengths=lengths, h=h, hkv=h // 2, causal=causal, window=window))
            for layout in ("zigzag", "contiguous", "striped"):
                cases.append(dict(strategy="allgather", layout=layout, lengths=lengths, h=h, hkv=1, causal=causal,
                                  window=window))
            meshes = [(world // 2, 2), (world, 1)] if world % 2 == 0 else [(world, 1), (1, world)]  # (ring, ulysses)
            for mesh in meshes:
                cases.append(dict(strategy="hybrid", mesh=mesh, layout="zigzag" if causal else "striped",
                                  lengths=lengths, h=2 * mesh[1], hkv=mesh[1], causal=causal, window=window))
    return cases


@pytest.mark.parametrize("world", [2, 3, 4])
def test_packed_documents_equal_per_document_attention_in_every_schedule(world):
    cases = _cases(world)
    results = run(run_cases, world, args=(cases,), timeout=300)
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases, per_rank):
            label = f"W={world} rank={rank} {case}"
            assert r["err"] <= 1e-5, (label, r["err"])
            want = _hand_work(case, world, rank)
            for phase in ("fwd", "bwd"):
                assert r["work"][phase] == r["counted"][phase] == want, (label, phase, r["work"], r["counted"], want)


def test_skipped_work_is_what_packing_saves():
    """Many short documents: the planned work is the per-document closed form, far below one document's."""
    from longctx.parallel import work_model

    n, world = 64, 4
    lengths = [8] * 8
    starts = Documents.from_lengths([lengths]).starts[0]
    for strategy in ("ring", "zigzag", "striped", "allgather", "ulysses"):
        packed = work_model(strategy, world=world, seq_len=n, causal=True, starts=starts)["table"]
        whole = work_model(strategy, world=world, seq_len=n, causal=True)["table"]
        per_rank = world if strategy == "ulysses" else 1  # ulysses: every rank does all pairs (on 1/W heads)
        assert sum(map(sum, packed)) == per_rank * 8 * (8 * 9 // 2), strategy
        assert sum(map(sum, whole)) == per_rank * n * (n + 1) // 2, strategy


def test_documents_validation_names_the_fix():
    with pytest.raises(ValueError, match="first document must start at 0"):
        Documents(8, ((1, 4),))
    with pytest.raises(ValueError, match="sum to 8"):
        Documents.from_lengths([[4, 3]], seq_len=8)
    with pytest.raises(ValueError, match="batch has 3"):
        Documents.from_lengths([[4, 4], [8]]).groups(3)
    ids = torch.tensor([[0, 0, 1, 1, 0, 0, 2, 2]])
    docs = Documents.from_ids(ids)
    assert docs.starts == ((0, 2, 4, 6),)  # an id reused later is a new document
    assert docs.rope_positions(torch.tensor([1, 2, 5, 7])).tolist() == [[1, 0, 1, 1]]
    assert docs.segment_ids().tolist() == [[0, 0, 1, 1, 2, 2, 3, 3]]

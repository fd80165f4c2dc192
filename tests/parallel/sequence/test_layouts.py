import pytest
import torch

from longctx.launch import run
from longctx.parallel import permutation, positions, shard, shard_batch, unshard
from longctx.parallel.sequence.layouts import check_seq


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_positions_partition_the_sequence(layout, world):
    n = 4 * world
    parts = [positions(layout, n, world, r) for r in range(world)]
    assert torch.equal(torch.cat(parts).sort().values, torch.arange(n))
    assert all(bool((p[1:] > p[:-1]).all()) for p in parts), "positions must increase within a shard"
    assert torch.equal(permutation(layout, n, world), torch.cat(parts))


def test_known_layouts():
    assert positions("zigzag", 16, 4, 1).tolist() == [2, 3, 12, 13]
    assert positions("striped", 8, 4, 1).tolist() == [1, 5]
    assert positions("contiguous", 8, 4, 3).tolist() == [6, 7]


def test_shard_batch_keeps_tokens_labels_positions_together():
    ids = torch.arange(16).view(1, 16) * 10
    labels = ids + 1
    out = shard_batch(ids, labels, "zigzag", rank=1, world=4)
    assert out["input_ids"].tolist() == [[20, 30, 120, 130]]
    assert out["labels"].tolist() == [[21, 31, 121, 131]]
    assert out["position_ids"].tolist() == [2, 3, 12, 13]


def test_bad_sequence_length_names_divisor():
    with pytest.raises(ValueError, match=r"not divisible by 8 .*pad it by 2 tokens to 16"):
        check_seq("zigzag", 14, 4)
    with pytest.raises(ValueError, match="unknown layout"):
        positions("spiral", 8, 2, 0)
    with pytest.raises(ValueError, match="outside a world"):
        positions("contiguous", 8, 2, 2)
    with pytest.raises(RuntimeError, match="no process group"):
        shard(torch.zeros(1, 8), "zigzag")


def _roundtrip(layout):
    import torch.distributed as dist

    x = torch.arange(2 * 24 * 3).view(2, 24, 3).float()
    local = shard(x, layout)
    return torch.equal(unshard(local, layout), x), local, dist.get_rank()


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
def test_shard_unshard_roundtrip(layout):
    res = run(_roundtrip, 3, args=(layout,), timeout=60)
    assert all(ok for ok, _, _ in res)
    x = torch.arange(2 * 24 * 3).view(2, 24, 3).float()
    for _, local, rank in res:
        assert torch.equal(local, x[:, positions(layout, 24, 3, rank)])


def _hybrid_as_documented(layout):
    """The README's flow with the hybrid strategy: shard with the context mesh, attend, unshard."""
    import torch.distributed as dist

    from longctx.parallel import attention, context_mesh, hybrid_positions
    from tests.parallel.sequence._workers import problem, reference

    mesh = context_mesh(2, 2)
    q, k, v, do = problem(1, 32, 4, 2, 8, torch.float64, seed=0)
    local = [shard(t, layout, group=mesh).requires_grad_() for t in (q, k, v)]
    out = attention(*local, causal=True, strategy="hybrid", group=mesh, layout=layout)
    want, _ = reference(q, k, v, do, True, None)
    ring, uly = mesh.get_local_rank("ring"), mesh.get_local_rank("ulysses")
    pair = (mesh.get_group("ulysses"), mesh.get_group("ring"))  # the (ulysses, ring) groups name it too
    return {"err": float((unshard(out.detach(), layout, group=mesh) - want).abs().max()),
            "cut": torch.equal(local[0].detach(), q[:, hybrid_positions(layout, 32, 2, 2, ring, uly)]),
            "pair": torch.equal(shard(q, layout, group=pair), local[0].detach()), "rank": dist.get_rank()}


def test_hybrid_shards_follow_the_context_mesh():
    """shard(x, layout, group=context_mesh(ring, ulysses)) cuts the positions hybrid runs on (its ring layout
    split over the Ulysses ranks, not `layout` over all ranks: that was 1.47 off the reference, unraised), and
    unshard puts them back."""
    for layout in ("zigzag", "striped"):
        for got in run(_hybrid_as_documented, 4, args=(layout,), timeout=120):
            assert got["err"] < 1e-10 and got["cut"] and got["pair"], (layout, got)

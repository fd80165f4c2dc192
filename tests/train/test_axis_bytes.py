"""Bytes per mesh axis of one micro-batch, counted at every collective torch issues, against the closed-form
model (longctx/train/axis_bytes.py) for tensor and context parallelism; data and pipeline bytes are counted
and must be there when the layout has those axes."""

from longctx.launch import run

from ._workers import axis_bytes, config

W2 = [
    ["parallel.tp=2", "parallel.dp_shard=1"],
    ["parallel.tp=2", "parallel.dp_shard=1", "parallel.activation_checkpoint=full"],
    ["parallel.cp=2", "parallel.dp_shard=1", "parallel.strategy=ring"],
]
W4 = [
    ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1"],
    ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1", "parallel.strategy=ulysses",
     "parallel.activation_checkpoint=selective"],
    ["parallel.cp=4", "parallel.strategy=hybrid", "parallel.ulysses=2"],
    ["parallel.dp_shard=2", "parallel.cp=2"],
    ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1", "model.n_layers=4"],
    # tp > n_kv_heads: replicated K/V heads, without and with FSDP2 (over the cp ranks)
    ["parallel.tp=4", "parallel.dp_shard=1"],
    ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1", "model.n_kv_heads=1"],
    # FSDP2 x TP after other tp layouts in this process: torch hands the 2-D parameters a cached mesh
    # whose group differs from the plan's tp group (both carry tp bytes)
    ["parallel.tp=2", "parallel.dp_shard=2"],
    # replicas of a tp model (HSDP, shard dimension 1): the norms' Partial gradients are all-reduced over tp
    # as under FSDP2, and the replicas all-reduce the gradients
    ["parallel.tp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1"],
]


def _check(layouts, world):
    res = run(axis_bytes, world, args=([config(*o) for o in layouts],), timeout=300)
    for rank, per_rank in enumerate(res):
        for o, r in zip(layouts, per_rank, strict=True):
            got, model = r["counted"], r["model"]
            label = (world, rank, o, got, model)
            # Comm's count of the attention = what the dispatcher saw on the cp groups (less dp's share there)
            assert got["on_cp_groups"] == got["cp"] + (got["dp"] if got["dp_on_cp_group"] else 0), label
            if "parallel.pp=2" in o:  # the model covers pp = 1; here: stage sends are counted
                assert got["pp"] > 0 and got["cp"] > 0, label
                continue
            assert got["tp"] == model["tp"] and got["cp"] == model["cp"], label
            tp = any(x.startswith("parallel.tp=") for x in o)
            assert (got["tp"] > 0) == tp and (got["cp"] > 0) == any(x.startswith("parallel.cp=") for x in o), label
    return res


def test_two_ranks():
    res = _check(W2, 2)
    assert res[0][1]["counted"]["tp"] > res[0][0]["counted"]["tp"]  # recomputed blocks gather again


def test_four_ranks():
    res = _check(W4, 4)
    assert res[0][3]["counted"]["dp"] > 0  # FSDP2 parameter gathers and gradient reduce-scatters
    assert res[0][-1]["counted"]["dp"] > 0

"""Tensor, pipeline and DeepSpeed data parallelism composed with context parallelism: each layout trains
like one process (fp32, 5 AdamW steps with clipping active and warmup; every step's loss and gradient norm
within 1e-5 relative, every final parameter within 1e-5, gathered to full tensors and compared by name).
A 4-layer model, so an interleaved pipeline has two stages per rank; one launch per world size."""

import pytest
import torch

from longctx.launch import run
from tests.support.equivalence import compare_runs, compare_validation, ran_auto_everywhere

from ._workers import config, train_and_collect

BASE = ["model.n_layers=4"]
# the held-out loss after steps 2, 4 and 5 too: forward only through each layout (pipeline schedules' eval);
# it changes no training step (test_validation.py), so one reference with it serves every comparison
VAL = ["validation.interval=2", "validation.batches=1"]
W2 = [
    ("tp=2", ["parallel.tp=2", "parallel.dp_shard=1"]),
    ("pp=2 gpipe", ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=gpipe"]),
    ("pp=2 interleaved 1f1b, 2 stages per rank", ["parallel.pp=2", "parallel.dp_shard=1",
                                                  "parallel.pp_schedule=interleaved_1f1b", "parallel.pp_virtual=2"]),
    ("pp=2 interleaved zero bubble", ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=interleaved_zb"]),
    # V schedules validate through the pipeline's own forward-only action list (parallel/pipeline.py)
    ("pp=2 zbv (V, zero bubble)", ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=zbv"]),
    ("pp=2 dualpipev, 4 microbatches", ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=dualpipev",
                                        "parallel.microbatches=4"]),
    ("pp=2 looped bfs", ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_schedule=looped_bfs"]),
    ("pp=2 1f1b, uneven split (1 + 3 layers), accumulation 2",
     ["parallel.pp=2", "parallel.dp_shard=1", "parallel.pp_split=[1]", "train.accumulation=2"]),
    ("tp=2 x accumulation 2", ["parallel.tp=2", "parallel.dp_shard=1", "train.accumulation=2"]),
]
W4 = [
    ("tp=2 x cp=2", ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1"]),
    ("tp=2 x cp=2 ulysses", ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1", "parallel.strategy=ulysses"]),
    ("pp=2 1f1b x cp=2, 4 microbatches", ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1",
                                          "parallel.pp_schedule=1f1b", "parallel.microbatches=4"]),
    ("tp=2 x pp=2", ["parallel.tp=2", "parallel.pp=2", "parallel.dp_shard=1"]),
    ("pp=2 x dp_shard=2 (FSDP2 per stage)", ["parallel.pp=2", "parallel.dp_shard=2", "parallel.microbatches=2"]),
    # split backward (weights' half later) under FSDP2 needs the parameters kept gathered (refused otherwise)
    ("pp=2 zbv x dp_shard=2, parameters kept gathered", ["parallel.pp=2", "parallel.dp_shard=2",
                                                         "parallel.microbatches=2", "parallel.pp_schedule=zbv",
                                                         "parallel.reshard_after_forward=false"]),
    # replicas of a tp/pp model: FSDP2 on the 2-D (dp_replicate, dp_shard x cp) mesh with a shard dimension of 1
    ("tp=2 x dp_replicate=2 (HSDP, replicas only)", ["parallel.tp=2", "parallel.dp_replicate=2",
                                                     "parallel.dp_shard=1"]),
    ("pp=2 x dp_replicate=2 (HSDP per stage)", ["parallel.pp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1",
                                                "parallel.microbatches=2"]),
]
W8 = [
    ("dp_shard=2 x tp=2 x cp=2", ["parallel.dp_shard=2", "parallel.tp=2", "parallel.cp=2"]),
    ("dp_replicate=2 x dp_shard=2 x tp=2 (HSDP x TP)", ["parallel.dp_replicate=2", "parallel.dp_shard=2",
                                                         "parallel.tp=2", "parallel.cp=1"]),
]
# tp > n_kv_heads: each K/V head shared by tp / n_kv_heads ranks (KVHeadLinear), alone and with FSDP2 and cp
SHARED_KV = [
    ("tp=4, 2 K/V heads", ["parallel.tp=4", "parallel.dp_shard=1"]),
    ("dp_shard=2 x tp=2, 1 K/V head", ["parallel.tp=2", "parallel.dp_shard=2", "model.n_kv_heads=1"]),
    ("tp=2 x cp=2, 1 K/V head", ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1", "model.n_kv_heads=1"]),
    # heads wider than dim / n_heads (Qwen3, Gemma): q/k/v/o are not square, tp splits n_heads x head_dim.
    # Adam's eps 1e-6: at 1e-8 it amplifies the rounding of near-zero gradients of this model into final
    # parameters 1.5e-5 apart under tp=2 x cp=2 (9e-6 under cp=4 alone; 5e-7 and 4e-7 at eps 1e-6)
    ("tp=2 x cp=2, head_dim 48 (dim / heads = 32)", ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1",
                                                     "model.head_dim=48", "train.eps=1e-6"]),
]
DEEPSPEED = [
    ("DeepSpeed ZeRO-1 x dp=2", ["parallel.engine=deepspeed", "parallel.zero_stage=1", "parallel.dp_shard=2"]),
    ("DeepSpeed ZeRO-2 x cp=2", ["parallel.engine=deepspeed", "parallel.zero_stage=2", "parallel.cp=2",
                                 "parallel.dp_shard=1"]),
    ("DeepSpeed ZeRO-3 x cp=2", ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.cp=2",
                                 "parallel.dp_shard=1"]),
    ("DeepSpeed ZeRO-3 x dp=2, accumulation 2", ["parallel.engine=deepspeed", "parallel.zero_stage=3",
                                                 "parallel.dp_shard=2", "train.accumulation=2"]),
    # partitioned as each module is built (deepspeed.zero.Init), then the layout-independent initial values
    ("DeepSpeed ZeRO-3 x cp=2, built in pieces", ["parallel.engine=deepspeed", "parallel.zero_stage=3",
                                                  "parallel.cp=2", "parallel.dp_shard=1", "parallel.meta_init=true"]),
]


@pytest.fixture(scope="module")
def reference():
    return run(train_and_collect, 1, args=([config(*BASE, *VAL)],), timeout=120)[0][0]


def _check(layouts, world, reference, timeout=600, validate=True):
    val = VAL if validate else []
    res = run(train_and_collect, world, args=([config(*BASE, *val, *o) for _, o in layouts],), timeout=timeout)
    ran_auto_everywhere(res)
    for (name, overrides), got in zip(layouts, res[0], strict=True):
        compare_runs(name, got, reference)
        if validate and "validation.interval=0" not in overrides:
            compare_validation(name, got, reference)
    return res


def test_two_rank_tensor_and_pipeline_layouts(reference):
    res = _check(W2, 2, reference)
    assert [r["engine"] for r in res[0]] == ["none"] * len(W2)


def test_four_rank_compositions_with_context_parallelism(reference):
    res = _check(W4, 4, reference)
    assert [r["engine"] for r in res[0]] == ["fsdp", "fsdp", "fsdp", "none", "fsdp", "fsdp", "hsdp", "hsdp"]


@pytest.mark.slow
def test_eight_ranks_tp_with_sharded_and_replicated_data(reference):
    res = _check(W8, 8, reference, validate=False)  # (its compositions validate at 4 ranks)
    assert [r["engine"] for r in res[0]] == ["fsdp", "hsdp"]


@pytest.mark.slow
def test_deepspeed_zero_stages(reference, tmp_path):
    pytest.importorskip("deepspeed", reason="pip install 'longctx[deepspeed]' (make test installs it)")
    offload = tmp_path / "offload.json"  # ZeRO-1 steps longctx's AdamW on the host (DeepSpeed demanded its own)
    offload.write_text('{"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}')
    zero1 = (f"{DEEPSPEED[0][0]}, optimizer offloaded", [*DEEPSPEED[0][1], f"parallel.deepspeed_config={offload}"])
    res = _check([zero1, DEEPSPEED[3]], 2, reference)
    pieces = _check([*DEEPSPEED[1:3], DEEPSPEED[4]], 2, reference)
    assert all(r["engine"] == "deepspeed" for per_rank in res + pieces for r in per_rank)
    # its CPU shared-memory op (a minute of g++ on a cold cache) serves only inference: never built
    assert all(r["ds_shm_op"] is False for per_rank in res + pieces for r in per_rank)
    whole, built = pieces[0][1], pieces[0][2]  # ZeRO-3 x cp=2 without and with meta_init: the same run, bitwise
    assert built["losses"] == whole["losses"] and built["grad_norms"] == whole["grad_norms"]
    assert all(torch.equal(built["params"][k], v) for k, v in whole["params"].items())


def test_tensor_parallel_beyond_the_kv_heads_and_with_wide_heads(reference):
    models = [["model.n_kv_heads=1"], ["model.head_dim=48", "train.eps=1e-6"]]  # when not the reference's
    refs = run(train_and_collect, 1, args=([config(*BASE, *m) for m in models],), timeout=120)[0]
    res = run(train_and_collect, 4, args=([config(*BASE, *o) for _, o in SHARED_KV],), timeout=600)
    for (name, o), got in zip(SHARED_KV, res[0], strict=True):
        own = [r for m, r in zip(models, refs) if m[0] in o]
        compare_runs(name, got, own[0] if own else reference)
    assert refs[1]["losses"] != reference["losses"]  # the wider heads are another model

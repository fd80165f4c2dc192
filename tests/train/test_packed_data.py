"""Training on packed token data: every layout equals one process, shards reassemble to the data, each
data rank reads its own sequences, DataLoader workers and resume give the same batches."""

import json

import numpy as np
import pytest
import torch

from longctx.config import from_dict
from longctx.data import TokenSource
from longctx.data.prepare import prepare
from longctx.data.synthetic import step_indices
from longctx.launch import run
from longctx.parallel import Documents
from longctx.train import model_flops_per_step
from tests.support.equivalence import compare_runs, compare_validation

from ._workers import config, packed_batches, train_and_collect


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("packed")
    rng = np.random.default_rng(2)
    with open(root / "d.jsonl", "w") as f:  # long-tailed document lengths: many short, a few long
        for i in range(120):
            n = int(min(rng.pareto(1.1) * 10 + 1, 150))
            f.write(json.dumps({"text": "".join(chr(97 + (3 * i + j) % 26) for j in range(n))}) + "\n")
    prepare(str(root / "d.jsonl"), str(root / "ds"), progress=False)
    return str(root / "ds")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory):
    """Other documents, prepared alike: the validation set."""
    root = tmp_path_factory.mktemp("held_out")
    rng = np.random.default_rng(3)
    with open(root / "v.jsonl", "w") as f:
        for i in range(40):
            n = int(min(rng.pareto(1.1) * 10 + 1, 150))
            f.write(json.dumps({"text": "".join(chr(97 + (5 * i + 2 * j) % 26) for j in range(n))}) + "\n")
    prepare(str(root / "v.jsonl"), str(root / "ds"), progress=False)
    return str(root / "ds")


def _tokens(path, *extra, run_dir):
    return config("data.source=tokens", f"data.path={path}", "model.vocab_size=258", *extra, run_dir=run_dir)


def test_packed_training_layouts_match_one_process(dataset, held_out, tmp_path):
    """... and so does the held-out loss of packed validation documents (validation.path), after steps 2, 4, 5."""
    val = [f"validation.path={held_out}", "validation.interval=2", "validation.batches=2"]
    ref = run(train_and_collect, 1, args=([_tokens(dataset, *val, run_dir=str(tmp_path / "ref"))],),
              timeout=120)[0][0]
    layouts = [("cp=4 zigzag", ["parallel.cp=4"]), ("cp=4 striped", ["parallel.cp=4", "parallel.strategy=striped"]),
               ("cp=4 hybrid", ["parallel.cp=4", "parallel.strategy=hybrid", "parallel.ulysses=2"]),
               ("dp_shard=2 x cp=2", ["parallel.dp_shard=2", "parallel.cp=2"]),
               ("pp=2 x cp=2", ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1"])]
    configs = [_tokens(dataset, *o, *val, run_dir=str(tmp_path / name.replace(" ", ""))) for name, o in layouts]
    results = run(train_and_collect, 4, args=(configs,), timeout=300)[0]
    assert list(ref["validation"]) == [2, 4, 5]
    for (name, _), got in zip(layouts, results):
        compare_runs(name, got, ref)
        compare_validation(name, got, ref)
        assert got["flops"] == ref["flops"], name  # the step's documents, counted once whatever the layout
    # FLOPs count the causal pairs inside each document (brute force here), not the full causal square
    cfg = from_dict(_tokens(dataset, run_dir="x"))
    m, t = cfg.model, cfg.train
    src = TokenSource(dataset, seq_len=t.seq_len, seed=t.seed, vocab_size=m.vocab_size)
    dense = model_flops_per_step(m, t.seq_len, t.batch_size)["dense"]
    full = model_flops_per_step(m, t.seq_len, t.batch_size)["total"]
    for step, flops in enumerate(ref["flops"]):
        doc_ids = src.batch(step_indices(step, batch_size=t.batch_size, dp_rank=0, dp_size=1, accumulation=1,
                                         micro=0))["doc_ids"]
        pairs = sum(1 for row in doc_ids for i in range(t.seq_len) for j in range(i + 1)
                    if bool((row[j:i + 1] == row[i]).all()))
        assert flops == dense + 12 * m.dim * m.n_layers * pairs < full, (step, flops, dense, pairs)


def test_shards_reassemble_and_each_data_rank_reads_its_own(dataset, tmp_path):
    steps = 3
    cfg = _tokens(dataset, "parallel.dp_shard=2", "parallel.cp=2", "data.workers=2", run_dir=str(tmp_path / "r"))
    views = run(packed_batches, 4, args=(cfg, steps), timeout=180)
    src = TokenSource(dataset, seq_len=64, seed=0, vocab_size=258)
    seen = set()
    for view in views:
        for step in range(steps):
            idx = step_indices(step, batch_size=4, dp_rank=view["dp_rank"], dp_size=2, accumulation=1, micro=0)
            want = src.batch(idx)
            got = view["batches"][step]
            assert torch.equal(got["input_ids"], want["input_ids"]) and torch.equal(got["labels"], want["labels"])
            assert got["documents"] == Documents.from_ids(want["doc_ids"]).starts
            seen.update(src.window(i) for i in idx)
    assert len(seen) == steps * 4  # 2 data ranks x 2 sequences per step, none read twice


def test_packed_resume_continues_with_the_same_batches(dataset, tmp_path):
    run_dir = str(tmp_path / "resume")
    full = run(train_and_collect, 2, args=([_tokens(dataset, "parallel.cp=2", run_dir=str(tmp_path / "full"))],),
               timeout=180)[0][0]
    # DataLoader workers make the steps ahead; they end with fit (no process outlives the rank)
    workers = ["parallel.cp=2", "data.workers=2"]
    stopped = run(train_and_collect, 2, args=([_tokens(dataset, *workers, "checkpoint.interval=1", run_dir=run_dir)],
                                              3), timeout=180)
    per_rank = run(train_and_collect, 2, args=([_tokens(dataset, *workers, "train.resume=auto", run_dir=run_dir)],),
                   timeout=180)
    resumed = per_rank[0][0]
    assert resumed["steps"] == [4, 5] and resumed["losses"] == full["losses"][3:]
    assert stopped[0][0]["losses"] == full["losses"][:3]
    assert all(r[0]["children"] == [] for r in stopped + per_rank), [r[0]["children"] for r in stopped + per_rank]

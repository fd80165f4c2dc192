"""parallelize: a context-parallel model equals the model on one device (float64); the plan owns the layout."""

import re

import pytest

from longctx.launch import run
from tests.support.backends import check_ran
from tests.support.equivalence import model_equivalence

from ._workers import expect_errors


@pytest.mark.parametrize("overrides", [
    ["parallel.strategy=zigzag"], ["parallel.strategy=ulysses"],
    # a stretched RoPE rotates each token by its true position on every rank, like plain RoPE
    ["parallel.strategy=striped", "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
     "model.rope_scaling.original_max_positions=8"],
    ["parallel.strategy=allgather"], ["parallel.strategy=hybrid", "parallel.ulysses=2"],
    ["parallel.strategy=ring", "model.window=5"],
], ids=lambda o: "-".join(x.split("=")[1] for x in o))
def test_context_parallel_model_matches_single_device(overrides):
    res = run(model_equivalence, 4, args=(overrides,), timeout=120)
    for err_logits, err_grads, _, _, ran in res:
        assert len(err_grads) == 3 + 2 * 9 and max(err_grads.values()) <= 1e-10, (overrides, err_grads)
        assert err_logits <= 1e-10, (overrides, err_logits)
        check_ran(ran, "auto")


def test_dilated_model_context_parallel_matches_single_device():
    # dilated layers need the contiguous split, so the other layers run the ring schedule
    dilated = ["parallel.strategy=ring", "model.dilated.layers=[1]", "model.dilated.w0=8"]
    res = run(model_equivalence, 4, args=(dilated, 64), timeout=120)
    for err_logits, err_grads, _, model, ran in res:
        assert "segment_lengths=[8, 16, 32, 64]" in model and "ContextParallelAttention" in model
        assert err_logits <= 1e-10 and max(err_grads.values()) <= 1e-10, (err_logits, err_grads)
        check_ran(ran, "auto")


BAD = [
    (dict(overrides=["parallel.strategy=zigzag", "model.dilated.layers=[0]", "model.dilated.w0=8"]),
     "ValueError", "dilated layers need the contiguous token layout.*parallel.layout=contiguous"),
    (dict(overrides=[], forward="twice"), "ValueError", "already parallelized"),
    (dict(overrides=[], forward="no_positions"), "ValueError", "needs position_ids: take input_ids and position_ids"),
    (dict(overrides=[], forward="wrong_positions"), "ValueError", "layout mismatch: the position ids"),
    (dict(overrides=["parallel.strategy=ulysses", "model.n_heads=2", "model.n_kv_heads=2", "model.dim=32"]),
     "ValueError", "2 query heads do not divide over 4 ranks"),
]


def test_parallelize_errors():
    results = run(expect_errors, 4, args=([("parallelize_with", kw) for kw, _, _ in BAD],), timeout=120)
    for (kw, typ, pattern), (got_type, msg) in zip(BAD, results[0]):
        assert got_type == typ and re.search(pattern, msg), (kw, got_type, msg)


def test_positions_are_checked_once_not_per_layer_or_step():
    from ._workers import position_checks

    for once, errors in run(position_checks, 4, timeout=120):
        assert once == 1
        assert len(errors) == 2 and all("layout mismatch" in e for e in errors), errors

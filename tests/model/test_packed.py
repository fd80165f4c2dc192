"""Packed documents through the model: every strategy equals the plain model run on each document alone."""

from longctx.launch import run
from tests.support.equivalence import packed_equivalence

# straddling documents, single-token documents, and a row that is one whole document
LENGTHS = [[5, 1, 13, 1, 1, 11], [32]]
OVERRIDES = [["parallel.strategy=zigzag"], ["parallel.strategy=striped"], ["parallel.strategy=ring"],
             ["parallel.strategy=allgather"], ["parallel.strategy=ulysses"],
             ["parallel.strategy=hybrid", "parallel.ulysses=2"], ["parallel.strategy=zigzag", "model.window=4"]]


def test_packed_model_equals_per_document_model():
    from tests.support.equivalence import packed_equivalence_many

    for per_rank in run(packed_equivalence_many, 4, args=(OVERRIDES, LENGTHS), timeout=300):
        for overrides, (err_logits, err_grads, _) in zip(OVERRIDES, per_rank):
            assert err_logits <= 1e-10 and max(err_grads.values()) <= 1e-10, (overrides, err_logits, err_grads)


def test_packed_model_on_one_device_equals_per_document_model():
    err_logits, err_grads, _ = run(packed_equivalence, 1, args=([], LENGTHS), timeout=60)[0]
    assert err_logits <= 1e-10 and max(err_grads.values()) <= 1e-10, (err_logits, err_grads)

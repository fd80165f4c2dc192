"""The held-out loss during training (train/validate.py): it changes nothing of training (one process, bit
for bit), it is the token-mean loss of the final model on held-out sequences (an oracle that runs the plain
model and torch's cross-entropy in float64), and bad settings are refused by name. Every parallel layout's
validation loss against one process: tests/train/test_parallel_axes.py and test_packed_data.py."""

import json

import pytest
import torch
import torch.nn.functional as F

from longctx.config import ConfigError, from_dict, load
from longctx.data import SyntheticSource
from longctx.data.prepare import prepare
from longctx.data.sources import VALIDATION_SEED_OFFSET
from longctx.launch import run
from longctx.model import build_model
from longctx.train import validate_job

from ._workers import BASE, config, train_and_collect, train_and_print

VAL = ["validation.interval=2", "validation.batches=2"]


def test_validation_changes_no_training_step_and_is_the_held_out_loss(tmp_path):
    plain, validated = run(train_and_collect, 1, args=([config(run_dir=str(tmp_path / "a")),
                                                        config(*VAL, run_dir=str(tmp_path / "b"))],), timeout=120)[0]
    assert validated["losses"] == plain["losses"] and validated["grad_norms"] == plain["grad_norms"]
    assert all(torch.equal(validated["params"][k], v) for k, v in plain["params"].items())
    assert plain["validation"] == {} and list(validated["validation"]) == [2, 4, 5]  # every 2 steps and the last
    assert len(set(validated["validation"].values())) == 3  # the model changed between them

    # the oracle: the final weights in the plain model, in float64, on sequences drawn from the held-out seed
    cfg = from_dict(config(*VAL))
    model = build_model(cfg.model).double()
    model.load_state_dict(validated["params"])
    t, d = cfg.train, cfg.data
    held_out = SyntheticSource(task=d.task, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size,
                               seed=t.seed + VALIDATION_SEED_OFFSET, alphabet=d.alphabet, period=d.period,
                               mask_prompt=d.mask_prompt).batch(range(2 * t.batch_size))
    with torch.no_grad():
        logits = model(held_out["input_ids"])
    loss = F.cross_entropy(logits.flatten(0, 1), held_out["labels"].flatten(), ignore_index=-100)
    assert abs(validated["validation"][5] - loss.item()) <= 1e-5 * loss.item(), (validated["validation"], loss)
    trained_on = SyntheticSource(task=d.task, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size, seed=t.seed,
                                 alphabet=d.alphabet, period=d.period, mask_prompt=d.mask_prompt)
    seen = trained_on.batch(range(t.steps * t.batch_size))["input_ids"]
    assert not any(torch.equal(row, seen_row) for row in held_out["input_ids"] for seen_row in seen)


def test_bad_validation_settings_are_refused_by_name(tmp_path):
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(30):
            f.write(json.dumps({"text": f"held out document {i} " * 3}) + "\n")
    prepare(str(tmp_path / "t.jsonl"), str(tmp_path / "train"), progress=False)
    prepare(str(tmp_path / "t.jsonl"), str(tmp_path / "small"), progress=False)
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs `tokenizers` (extra: hf)")
    other = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "held": 1}, unk_token="[UNK]"))
    other.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    other.save(str(tmp_path / "other.json"))
    prepare(str(tmp_path / "t.jsonl"), str(tmp_path / "other"), tokenizer=str(tmp_path / "other.json"),
            progress=False)
    tokens = [*BASE, "data.source=tokens", f"data.path={tmp_path / 'train'}", "model.vocab_size=258"]
    cases = [
        ([*BASE, "validation.batches=0", "validation.interval=1"], r"validation.batches must be > 0, got 0"),
        ([*BASE, "validation.interval=-1"], r"validation.interval must be >= 0, got -1"),
        ([*tokens, "validation.interval=2"], r"data.source=tokens needs held-out data: validation.holdout=N .* or "
                                             r"validation.path=DIR"),
        ([*tokens, "validation.interval=2", "validation.holdout=2", f"validation.path={tmp_path / 'small'}"],
         r"validation.path and validation.holdout both say where"),
        ([*tokens, "validation.holdout=100000"], r"validation.holdout=100000 windows leave nothing to train on"),
        ([*tokens, "validation.interval=2", "validation.holdout=1", "validation.batches=1"],
         r"validation.batches=1 x train.batch_size=4 needs 4 sequences of 64 tokens; validation.holdout=1 holds 1: "
         r"hold out 4 windows \(validation.holdout=4\), or lower train.batch_size"),
        ([*BASE, "validation.holdout=3"], r"validation.holdout applies to data.source=tokens"),
        ([*tokens, "validation.interval=2", f"validation.path={tmp_path / 'train'}"], r"is the training data"),
        ([*tokens, "validation.interval=2", f"validation.path={tmp_path / 'nope'}"],
         r"validation.path=.* is not a prepared dataset"),
        ([*tokens, "validation.interval=2", "validation.batches=100", f"validation.path={tmp_path / 'small'}"],
         r"validation.batches=100 x train.batch_size=4 needs 400 sequences of 64 tokens; validation.path holds "
         r"\d+: set validation.batches=\d+, or prepare more held-out documents into validation.path"),
        ([*tokens, "validation.interval=2", "validation.batches=1", f"validation.path={tmp_path / 'other'}"],
         r"validation.path=.*other' was tokenized with '.*other.json', data.path=.*train' with 'byte'; prepare the "
         r"held-out documents with data.path's tokenizer"),
        ([*BASE, "validation.interval=2", f"validation.path={tmp_path / 'small'}"],
         r"validation.path applies to data.source=tokens"),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message):
            validate_job(load(overrides=overrides), 1)
    # without validation they would do nothing: said (the holdout still keeps its windows from training: allowed)
    with pytest.raises(ConfigError, match=r"validation.path=.* has no effect with validation.interval=0"):
        validate_job(load(overrides=[*tokens, f"validation.path={tmp_path / 'small'}"]), 1)
    validate_job(load(overrides=[*tokens, "validation.holdout=2"]), 1)


def test_a_holdout_of_the_training_data_validates_alike_on_every_layout(tmp_path):
    """validation.holdout=N on packed token data: the same held-out loss at cp=2 zigzag as in one process;
    resuming with another holdout says that the training windows change."""
    with open(tmp_path / "t.jsonl", "w") as f:
        for i in range(60):
            f.write(json.dumps({"text": "".join(chr(97 + (7 * i + 3 * j) % 26) for j in range(5 + i % 40))}) + "\n")
    prepare(str(tmp_path / "t.jsonl"), str(tmp_path / "ds"), progress=False)
    tokens = ["data.source=tokens", f"data.path={tmp_path / 'ds'}", "model.vocab_size=258", "validation.holdout=8",
              *VAL]
    one = run(train_and_collect, 1, args=([config(*tokens, run_dir=str(tmp_path / "one"))],), timeout=120)[0][0]
    two = run(train_and_collect, 2, args=([config(*tokens, "parallel.cp=2", "parallel.dp_shard=1",
                                                  "checkpoint.interval=5", run_dir=str(tmp_path / "two"))],),
              timeout=120)[0][0]
    for holdout, warned in ((8, False), (12, True)):
        resumed = config(*tokens, f"validation.holdout={holdout}", "train.steps=6", "train.resume=auto",
                         run_dir=str(tmp_path / "two"))
        steps, printed = run(train_and_print, 1, args=(resumed,), timeout=120)[0]
        assert steps == [6] and "resumed from" in printed, printed
        assert ("trained with validation.holdout=8 and train.seq_len=64, this run with 12 and 64: the training "
                "windows (and their order) change" in printed) == warned, printed
        assert "is not the dataset" not in printed, printed
    # data.path prepared again from more documents: the same settings, other windows
    with open(tmp_path / "t.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document"}) + "\n")
    prepare(str(tmp_path / "t.jsonl"), str(tmp_path / "ds"), progress=False)
    resumed = config(*tokens, "train.steps=6", "train.resume=auto", run_dir=str(tmp_path / "two"))
    steps, printed = run(train_and_print, 1, args=(resumed,), timeout=120)[0]
    assert steps == [6] and "resumed from" in printed, printed
    assert (f"data.path={str(tmp_path / 'ds')!r} is not the dataset {tmp_path / 'two'}" in printed
            and "(tokens 1330 -> 1348, documents 60 -> 61): prepared again since" in printed), printed
    assert list(one["validation"]) == [2, 4, 5]
    for step, loss in one["validation"].items():
        assert abs(two["validation"][step] - loss) <= 1e-5 * loss, (step, two["validation"], one["validation"])

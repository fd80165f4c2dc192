"""Packed token data: each token once per epoch across data ranks, boundaries kept, resume exact, workers."""

import json

import numpy as np
import pytest
import torch

from longctx.data import RetrievalTask, TokenSource
from longctx.data.labels import IGNORE_INDEX
from longctx.data.loader import StepBatches, StepLoader
from longctx.data.prepare import prepare
from longctx.data.tasks import KEY, QUERY, SEP


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    rng = np.random.default_rng(1)
    lengths = [int(x) for x in np.minimum(rng.pareto(1.2, 60) * 8 + 1, 200)]  # long-tailed document lengths
    with open(root / "d.jsonl", "w") as f:
        for i, n in enumerate(lengths):
            f.write(json.dumps({"text": "".join(chr(97 + (i + j) % 26) for j in range(n))}) + "\n")
    prepare(str(root / "d.jsonl"), str(root / "ds"), progress=False)
    return str(root / "ds"), [n + 1 for n in lengths]  # + eos


def _stream(path):
    meta = json.load(open(f"{path}/meta.json"))
    return np.memmap(f"{path}/tokens.bin", dtype=meta["dtype"], mode="r").astype(np.int64)


def test_every_token_is_an_input_once_per_epoch_across_data_ranks(dataset):
    path, doc_lengths = dataset
    src = TokenSource(path, seq_len=16, seed=3, vocab_size=258)
    stream = _stream(path)
    batch, dp = 4, 2
    steps = -(-src.n_sequences // batch)
    seen = []
    for step in range(steps):
        for rank in range(dp):
            b = StepBatches(src, batch_size=batch, dp_rank=rank, dp_size=dp, accumulation=2)[step][1]
            for micro in b:
                for row, lab in zip(micro["input_ids"], micro["labels"]):
                    seen.append((row, lab))
    windows = [src.window(i) for i in range(src.n_sequences)]
    assert sorted(windows) == list(range(src.n_sequences)) and windows != sorted(windows)  # a shuffled epoch
    first_epoch = seen[: src.n_sequences]
    rebuilt = torch.cat([first_epoch[windows.index(w)][0] for w in range(src.n_sequences)])
    assert rebuilt[: stream.size].tolist() == stream.tolist()  # each token once, padding only at the end
    assert (rebuilt[stream.size:] == src.pad_id).all()


def test_a_damaged_dataset_is_an_error_naming_the_argument(dataset, tmp_path):
    import shutil

    def damaged(name, **files):
        path = tmp_path / name
        shutil.copytree(dataset[0], path)
        for f, data in files.items():
            (path / f.replace("_", ".")).write_bytes(data)
        return str(path)

    def source(path, what="data.path"):
        return TokenSource(path, seq_len=16, seed=0, vocab_size=258, what=what)

    with pytest.raises(ValueError, match=r"validation.path=.*meta.json is not valid JSON \(.*\): prepare the dataset "
                                         r"again with: longctx data prepare"):
        source(damaged("json", meta_json=b"{broken"), "validation.path")
    with pytest.raises(ValueError, match=r"data.path=.*meta.json lacks dtype, vocab_size: prepare"):
        source(damaged("keys", meta_json=b'{"tokens": 5}'))
    tokens = open(f"{dataset[0]}/tokens.bin", "rb").read()
    with pytest.raises(ValueError, match=r"--data=.*tokens.bin holds 10 bytes but meta.json says .* a truncated or "
                                         r"wrong file; prepare the dataset again"):
        source(damaged("short", tokens_bin=tokens[:10]), "--data")
    with pytest.raises(ValueError, match=r"data.path=.*offsets.npy is not a readable .npy array"):
        source(damaged("offsets", offsets_npy=b"garbage"))
    np.save(tmp_path / "o.npy", np.array([0, 3], dtype=np.int64))
    with pytest.raises(ValueError, match=r"data.path=.*offsets.npy spans tokens 0..3 but meta.json says"):
        source(damaged("offsets2", offsets_npy=(tmp_path / "o.npy").read_bytes()))
    # shorter than one sequence: every window would be mostly padding, trained on as if it were text
    n = TokenSource(dataset[0], seq_len=16, seed=0, vocab_size=258).n_tokens
    with pytest.raises(ValueError, match=rf"data.path=.* holds {n:,} tokens, not one window of {n:,} tokens and "
                                         rf"the label after it; use a sequence length below {n:,}"):
        TokenSource(dataset[0], seq_len=n, seed=0, vocab_size=258)
    TokenSource(dataset[0], seq_len=n - 1, seed=0, vocab_size=258)
    # ids the model has no row for: a config to change when training, other data when evaluating a checkpoint
    with pytest.raises(ValueError, match=r"data.path=.* vocabulary of 258 ids, more than the model's 100 "
                                         r"\(model.vocab_size\); raise model.vocab_size to at least 258"):
        TokenSource(dataset[0], seq_len=16, seed=0, vocab_size=100)
    with pytest.raises(ValueError, match=r"--data=.* more than the model's 100 \(model.vocab_size\); use data "
                                         r"prepared with the tokenizer this model was trained with"):
        TokenSource(dataset[0], seq_len=16, seed=0, vocab_size=100, what="--data")


def test_labels_and_document_ids_keep_the_boundaries(dataset):
    path, doc_lengths = dataset
    src = TokenSource(path, seq_len=32, seed=0, vocab_size=258, shuffle=False)
    stream = _stream(path)
    starts = np.concatenate([[0], np.cumsum(doc_lengths)])
    for i in range(src.n_sequences):
        inp, lab, doc = src.sequence(i)
        a = i * 32
        for t in range(32):
            p = a + t
            if p >= stream.size:
                assert inp[t] == src.pad_id and lab[t] == IGNORE_INDEX
                continue
            assert inp[t] == stream[p]
            d = np.searchsorted(starts, p, side="right") - 1
            same_doc_next = p + 1 < starts[d + 1]
            assert lab[t] == (stream[p + 1] if same_doc_next else IGNORE_INDEX), (i, t)
            d0 = np.searchsorted(starts, a, side="right") - 1
            assert doc[t] == d - d0


def test_resume_mid_epoch_continues_with_the_same_batches(dataset):
    path, _ = dataset
    src = TokenSource(path, seq_len=16, seed=5, vocab_size=258)
    make = lambda workers: StepLoader(StepBatches(src, batch_size=2, dp_rank=1, dp_size=2, accumulation=1), workers)  # noqa: E731
    straight = make(0)
    full = [straight.get(s) for s in range(12)]
    resumed = make(2)  # DataLoader workers inside the rank, started at step 7
    for s in range(7, 12):
        got = resumed.get(s)
        assert all(torch.equal(g[k], f[k]) for g, f in zip(got, full[s]) for k in f), s
    again = resumed.get(3)  # out of order: the loader restarts there
    assert torch.equal(again[0]["input_ids"], full[3][0]["input_ids"])
    resumed.close()


def test_retrieval_tasks_label_only_the_answer():
    for kind, extra in (("passkey", {}), ("needle", {"depth": 0.5}), ("recall", {"pairs": 5})):
        task = RetrievalTask(kind=kind, seq_len=96, vocab_size=64, seed=0, digits=4, **extra)
        batch = task.batch([0, 1, 2])
        inp, lab = batch["input_ids"], batch["labels"]
        assert inp.shape == lab.shape == (3, 96)
        assert ((lab != IGNORE_INDEX).sum(1) == 4).all()
        for row, labels in zip(inp, lab):
            q = int((row == QUERY).nonzero()[-1])
            key = row[q + 1]
            fact = int(((row[:-1] == key) & (row[1:] == SEP)).nonzero()[0])  # KEY k SEP d.. earlier
            answer = row[fact + 2:fact + 6]
            assert labels[-4:].tolist() == answer.tolist(), kind
        prompt, answer = task.prompt(4, 128, 0.0)
        assert prompt.numel() + answer.numel() == 129 and prompt[-1] == SEP
    with pytest.raises(ValueError, match="vocab_size=20 is too small"):
        RetrievalTask(kind="passkey", seq_len=64, vocab_size=20, seed=0)
    with pytest.raises(ValueError, match="too short"):
        RetrievalTask(kind="recall", seq_len=16, vocab_size=64, seed=0, pairs=4)


def test_recall_evaluated_by_depth_puts_the_asked_fact_there():
    """eval needle's --depths on a recall checkpoint: the asked fact starts at depth x (haystack - fact), the
    other facts around it, none overlapping; where the haystack is too tight for that, as near as fits."""
    for pairs, length in ((3, 200), (4, 64), (2, 40), (5, 48), (5, 44)):  # the last: 3 free tokens
        task = RetrievalTask(kind="recall", seq_len=length, vocab_size=64, seed=1, pairs=pairs)
        fact = 3 + task.digits
        hay = length + 1 - fact
        for index in range(10**9, 10**9 + 30):
            for depth in (0.0, 0.3, 0.5, 1.0):
                tokens, answer_at = task.example(index, length, depth)
                starts = [j for j in range(hay) if tokens[j] == KEY]
                assert len(starts) == pairs and all(b - a >= fact for a, b in zip(starts, starts[1:]))
                asked = [j for j in starts if tokens[j + 1] == tokens[hay + 1]]
                assert len(asked) == 1 and tokens[asked[0] + 3:asked[0] + fact].tolist() == tokens[answer_at:].tolist()
                want = round(depth * (hay - fact))
                roomy = hay - pairs * fact >= fact
                assert asked[0] == want if roomy else abs(asked[0] - want) <= fact, (pairs, length, depth, asked)


def test_packed_retrieval_examples_are_documents_with_their_own_answers():
    task = RetrievalTask(kind="passkey", seq_len=256, vocab_size=64, seed=0, pack_min=32)
    batch = task.batch(range(6))
    for row, labels, doc in zip(batch["input_ids"], batch["labels"], batch["doc_ids"]):
        lengths = doc.unique_consecutive(return_counts=True)[1].tolist()
        assert sum(lengths) == 256 and all(n >= 32 for n in lengths)
        assert int((labels != IGNORE_INDEX).sum()) == 4 * len(lengths)  # every example's answer is labelled
        start = 0
        for n in lengths:  # each document ends with its own question and answer
            assert row[start + n - 6] == QUERY and row[start + n - 4] == SEP  # inputs stop before the last digit
            start += n
    assert any(len(d.unique()) > 1 for d in batch["doc_ids"])
    with pytest.raises(ValueError, match="data.pack_min=8 must be between 14"):
        RetrievalTask(kind="passkey", seq_len=256, vocab_size=64, seed=0, pack_min=8)


def test_packed_lengths_tell_nothing_of_the_examples():
    """The lengths a packed sequence is cut into are drawn apart from its examples: drawn from example 1's own
    random stream, they gave away its key (mutual information ~1.4 nats of at most log 16; ~0.12 by chance in
    the ~400 samples here)."""
    task = RetrievalTask(kind="passkey", seq_len=256, vocab_size=64, seed=0, pack_min=64)
    first_lengths, keys = [], []
    for index in range(600):
        tokens, _, doc = task.packed(index)
        lengths = doc.unique_consecutive(return_counts=True)[1].tolist()
        if len(lengths) > 1:
            second = tokens[lengths[0]:lengths[0] + lengths[1]]
            assert second[-6] == QUERY
            first_lengths.append(lengths[0] // 24)  # bins of 24 tokens
            keys.append(int(second[-5]))  # the key asked for, after QUERY
    assert len(keys) > 300
    joint = np.zeros((max(first_lengths) + 1, max(keys) + 1))
    np.add.at(joint, (first_lengths, keys), 1)
    joint /= joint.sum()
    outer = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    seen = joint > 0
    assert float((joint[seen] * np.log(joint[seen] / outer[seen])).sum()) < 0.4


def test_a_holdout_split_keeps_training_off_the_last_windows(dataset):
    """validation.holdout=N: training reads windows 0..total-N-1 (every epoch, shuffled), validation exactly the
    last N, in order; the two never share a window."""
    from omegaconf import OmegaConf

    from longctx.data.sources import build_source, build_validation_source

    path = dataset[0]
    total = TokenSource(path, seq_len=16, seed=3, vocab_size=258).n_sequences
    data = OmegaConf.create({"source": "tokens", "path": path, "shuffle": True})
    validation = OmegaConf.create({"path": None, "holdout": 3, "batches": 1})
    train = build_source(data, seq_len=16, vocab_size=258, seed=3, holdout=3)
    val = build_validation_source(data, validation, seq_len=16, vocab_size=258, seed=3, batch_size=3)
    assert train.n_sequences == total - 3 and val.n_sequences == 3
    read = {train.window(i) for i in range(2 * train.n_sequences)}  # two epochs
    assert read == set(range(total - 3))
    assert [val.window(i) for i in range(3)] == [total - 3, total - 2, total - 1]
    assert torch.equal(val.batch(range(3))["input_ids"],
                       TokenSource(path, seq_len=16, seed=3, vocab_size=258, shuffle=False).batch(
                           range(total - 3, total))["input_ids"])
    with pytest.raises(ValueError, match=rf"validation.holdout={total} windows leave nothing to train on.*hold out "
                                         rf"fewer \(e.g. validation.holdout={max(total // 20, 1)}\)"):
        build_source(data, seq_len=16, vocab_size=258, seed=3, holdout=total)
    # one window in all: no holdout fits, and the message does not offer the one that just failed
    whole = TokenSource(path, seq_len=16, seed=3, vocab_size=258).n_tokens - 1
    with pytest.raises(ValueError, match=r"holds 1 window of \d+ tokens; one window cannot be split: give a shorter "
                                         r"train.seq_len, more data, or .*validation.path=DIR") as e:
        build_source(data, seq_len=whole, vocab_size=258, seed=3, holdout=1)
    assert "holdout=1)" not in str(e.value)


def test_a_training_split_never_reads_the_first_held_out_token(tmp_path):
    """One document across the split: the last training window's last label (the first held-out token) is
    ignored, not trained on; everything else of that window, and the held-out windows, read as before."""
    with open(tmp_path / "one.jsonl", "w") as f:
        f.write(json.dumps({"text": "".join(chr(97 + j % 26) for j in range(100))}) + "\n")
    prepare(str(tmp_path / "one.jsonl"), str(tmp_path / "ds"), progress=False)
    whole = TokenSource(str(tmp_path / "ds"), seq_len=16, seed=0, vocab_size=258, shuffle=False)
    train, held = whole.restricted(0, whole.total_windows - 2), whole.restricted(whole.total_windows - 2,
                                                                                 whole.total_windows)
    last = train.n_sequences - 1
    (x, y, d), (x0, y0, d0) = train.sequence(last), whole.sequence(last)
    assert int(y0[-1]) == int(_stream(str(tmp_path / "ds"))[(last + 1) * 16])  # the held-out token, unsplit
    assert int(y[-1]) == IGNORE_INDEX and torch.equal(y[:-1], y0[:-1]) and torch.equal(x, x0) and torch.equal(d, d0)
    for i in range(held.n_sequences):
        assert all(torch.equal(a, b) for a, b in zip(held.sequence(i), whole.sequence(last + 1 + i)))

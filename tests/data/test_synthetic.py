"""Synthetic sequences: determined by (seed, index) alone, so every layout reads the same data."""

import pytest
import torch

from longctx.data import SyntheticSource
from longctx.data.synthetic import step_indices


def _src(task="induction", **kw):
    kw.setdefault("period", 4)
    return SyntheticSource(task=task, seq_len=kw.pop("seq_len", 16), vocab_size=256, seed=kw.pop("seed", 0), **kw)


def test_sequences_depend_only_on_seed_and_index():
    a, b = _src(), _src()
    assert torch.equal(a.sequence(5)[0], b.sequence(5)[0])
    assert not torch.equal(a.sequence(5)[0], a.sequence(6)[0])
    assert not torch.equal(a.sequence(5)[0], _src(seed=1).sequence(5)[0])
    x, y = a.batch([3, 4]).values()
    assert x.shape == y.shape == (2, 16) and torch.equal(x[1], a.sequence(4)[0])


def test_tasks():
    x, y = _src("induction", period=4, alphabet=5).sequence(0)
    assert torch.equal(x[4:], x[:-4]) and torch.equal(y[:-1], x[1:]) and int(x.max()) < 5
    prompt_lens = set()
    for index in range(20):  # 64 tokens: a prompt of 17..48 tokens, then the prompt again (repeated)
        x, y = _src("copy", seq_len=63).sequence(index)
        full = torch.cat([x, y[-1:]])
        p = int((y == -100).sum()) + 1  # targets inside the prompt are ignored: the first p - 1 labels
        assert 17 <= p <= 48 and (y[: p - 1] == -100).all() and (y[p - 1:] != -100).all()
        assert torch.equal(full[p:], full[: 64 - p]) and not torch.equal(full[p - 1:], full[: 65 - p])
        prompt_lens.add(p)
    assert len(prompt_lens) > 5  # sequences differ in how many labels count
    assert (_src("copy", seq_len=15, mask_prompt=False).sequence(0)[1] != -100).all()
    x, _ = _src("random", alphabet=3).sequence(0)
    assert set(x.tolist()) <= {0, 1, 2}


def test_every_split_of_a_step_reads_the_same_sequences():
    whole = list(step_indices(2, batch_size=8, dp_rank=0, dp_size=1, accumulation=1, micro=0))
    assert whole == list(range(16, 24))
    split = [i for r in range(2) for m in range(2)
             for i in step_indices(2, batch_size=8, dp_rank=r, dp_size=2, accumulation=2, micro=m)]
    assert split == whole


def test_bad_arguments():
    with pytest.raises(ValueError, match="data.task='poem'"):
        _src("poem")
    with pytest.raises(ValueError, match="data.alphabet=1"):
        _src(alphabet=1)
    with pytest.raises(ValueError, match="data.period=99"):
        _src(period=99)

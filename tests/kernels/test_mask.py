import itertools

import pytest
import torch

from longctx.kernels import Mask


def _brute(mask, sq, sk):
    off = mask.diag(sq, sk)
    ok = torch.zeros(sq, sk, dtype=torch.bool)
    for i, j in itertools.product(range(sq), range(sk)):
        d = j - (i + off)
        ok[i, j] = (mask.left is None or d >= -mask.left) and (mask.right is None or d <= mask.right)
    return ok


MASKS = [Mask.none(), Mask.causal(), Mask.causal(offset=2), Mask.causal(offset=-2), Mask.shifted_causal(),
         Mask.sliding_window(3), Mask.sliding_window(2, causal=False), Mask.sliding_window(4, offset=-1)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.kind)
@pytest.mark.parametrize("sq,sk", [(5, 5), (3, 7), (7, 3), (1, 1)])
def test_dense_matches_rule_and_counts(mask, sq, sk):
    ref = _brute(mask, sq, sk)
    assert torch.equal(mask.dense(sq, sk)[0], ref)
    assert mask.band_pairs(sq, sk) == int(ref.sum()) == mask.count_pairs(sq, sk)
    assert mask.is_empty(sq, sk) == (not ref.any())
    assert mask.is_full(sq, sk) == bool(ref.all())
    for i in range(sq):
        lo, hi = mask.key_range(i, sq, sk)
        row = ref[i].nonzero().flatten().tolist()
        assert (row == list(range(lo, hi)))


def test_bottom_right_alignment():
    # flash-attn convention: with fewer queries than keys the last query sees every key
    m = Mask.causal().dense(2, 5)[0]
    assert m[1].all() and m[0].tolist() == [True, True, True, True, False]


def test_shifted_excludes_diagonal():
    m = Mask.shifted_causal().dense(4, 4)[0]
    assert not m.diagonal().any() and m[3, :3].all() and not m[0].any()


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.kind)
def test_sub_block_reexpresses_global_rule(mask):
    sq, sk = 9, 11
    full = mask.dense(sq, sk)[0]
    for q0, q1, k0, k1 in [(0, 4, 0, 5), (4, 9, 5, 11), (2, 7, 3, 10), (8, 9, 0, 11)]:
        sub = mask.sub(q0, q1, k0, k1, sq, sk)
        assert torch.equal(sub.dense(q1 - q0, k1 - k0)[0], full[q0:q1, k0:k1])


def test_documents():
    qd = torch.tensor([[0, 0, 1, 1, 2]])
    m = Mask.documents(qd, causal=True)
    d = m.dense(5, 5)[0]
    assert d[1, 0] and not d[2, 1] and d[3, 2] and not d[4, 3] and d[4, 4] and not d[0, 1]
    assert m.count_pairs(5, 5) == int(d.sum())
    sub = m.sub(2, 5, 1, 4, 5, 5)
    assert torch.equal(sub.dense(3, 3)[0], d[2:5, 1:4])


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(left=1.5), TypeError, "left"),
    (dict(right="0"), TypeError, "right"),
    (dict(left=-1), ValueError, "left"),
    (dict(q_doc=torch.zeros(1, 3, dtype=torch.long)), ValueError, "k_doc"),
    (dict(q_doc=torch.zeros(3), k_doc=torch.zeros(3)), ValueError, "q_doc"),
    (dict(q_doc=torch.zeros(1, 3), k_doc=torch.zeros(1, 3)), TypeError, "integer"),
])
def test_bad_mask_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        Mask(**kwargs)


def test_bad_window():
    with pytest.raises(ValueError, match="window"):
        Mask.sliding_window(0)


def test_from_flags():
    assert Mask.from_flags(False).kind == "none" and Mask.from_flags(True).kind == "causal"
    assert Mask.from_flags(True, 3).kind == "window(left=2,right=0)"
    assert Mask.from_flags(False, 3).kind == "window(left=2,right=2)"

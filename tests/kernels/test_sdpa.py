import itertools

import pytest
import torch

from longctx.kernels import Mask
from longctx.kernels.sdpa import pieces

MASKS = [Mask.none(), Mask.causal(), Mask.shifted_causal()] + [Mask.causal(offset=o) for o in range(-9, 10)] + \
    [Mask(right=r, offset=o) for r in (-2, 1, 3) for o in (-2, 0, 2)]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.kind)
def test_pieces_cover_the_mask_with_square_triangles(mask):
    """Square causal pieces mean the same under top-left (CPU op) and bottom-right (CUDA op) alignment."""
    for sq, sk in itertools.product(range(1, 8), range(1, 8)):
        got = torch.zeros(sq, sk, dtype=torch.int)
        for q0, q1, k0, k1, causal in pieces(mask, sq, sk):
            assert q1 > q0 and k1 > k0
            blk = torch.ones(q1 - q0, k1 - k0, dtype=torch.bool)
            if causal:
                assert q1 - q0 == k1 - k0
                blk = blk.tril()
            got[q0:q1, k0:k1] += blk.int()
        assert got.max() <= 1 and torch.equal(got.bool(), mask.dense(sq, sk)[0]), (sq, sk)


def test_masks_the_op_cannot_cut_go_dense_or_fall_back():
    assert pieces(Mask.sliding_window(3), 4, 4) is None
    assert pieces(Mask.documents(torch.zeros(1, 4, dtype=torch.long)), 4, 4) is None

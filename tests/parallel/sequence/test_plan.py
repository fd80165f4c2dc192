"""Block tables against global positions, exhaustively; counted imbalance against docs/algorithms.md §4."""

import pytest
import torch

from longctx.parallel import positions, step_blocks, work_model
from longctx.parallel.sequence.plan import imbalance, work_table


def _truth(layout, n, world, r, src, causal, window):
    qp = positions(layout, n, world, r)[:, None]
    kp = positions(layout, n, world, src)[None, :]
    ok = torch.ones(qp.shape[0], kp.shape[1], dtype=torch.bool)
    if causal:
        ok &= kp <= qp
    if window is not None:
        ok &= (qp - kp) <= window - 1
        if not causal:
            ok &= (kp - qp) <= window - 1
    return ok


def _covered(blocks, c):
    got = torch.zeros(c, c, dtype=torch.int32)
    for b in blocks:
        got[b.q0:b.q1, b.k0:b.k1] += b.mask.dense(b.q1 - b.q0, b.k1 - b.k0)[0].int()
    return got


@pytest.mark.parametrize("layout", ["contiguous", "zigzag", "striped"])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("causal,window", [(True, None), (False, None), (True, 3), (True, 11), (False, 5)])
def test_blocks_cover_exactly_the_allowed_pairs(layout, world, causal, window):
    n = 4 * world * 2
    c = n // world
    for r in range(world):
        for src in range(world):
            blocks = step_blocks(layout, n, world, r, src, causal, window)
            got = _covered(blocks, c)
            assert got.max() <= 1, "a pair is computed twice"
            assert torch.equal(got.bool(), _truth(layout, n, world, r, src, causal, window))
            assert all(not b.mask.is_empty(b.q1 - b.q0, b.k1 - b.k0) for b in blocks), "empty block not skipped"


def test_tables_match_algorithms_md():
    n, w = 32, 4
    # contiguous: diagonal causal, full below, skipped above
    assert [len(step_blocks("contiguous", n, w, 2, s, True)) for s in range(4)] == [1, 1, 1, 0]
    assert step_blocks("contiguous", n, w, 2, 1, True)[0].mask.kind == "none"
    # striped: causal for src <= r, shifted (as q[1:] x k[:-1]) for src > r
    (b,) = step_blocks("striped", n, w, 1, 3, True)
    assert (b.q0, b.q1, b.k0, b.k1, b.mask.kind) == (1, 8, 0, 7, "causal@+0")
    # zigzag: one causal block, then q x k[:h] or q[h:] x k, unmasked
    assert step_blocks("zigzag", n, w, 1, 1, True)[0].mask.kind == "causal@+0"
    assert [(b.q0, b.q1, b.k0, b.k1, b.mask.kind) for b in step_blocks("zigzag", n, w, 2, 0, True)] == \
        [(0, 8, 0, 4, "none")]
    assert [(b.q0, b.q1, b.k0, b.k1, b.mask.kind) for b in step_blocks("zigzag", n, w, 0, 3, True)] == \
        [(4, 8, 0, 8, "none")]


def test_window_skips_blocks_outside():
    # window 3 at 8 tokens per rank: only the own shard and the previous one are touched
    steps = [len(step_blocks("contiguous", 64, 8, 5, (5 - s) % 8, True, 3)) for s in range(8)]
    assert steps == [1, 1, 0, 0, 0, 0, 0, 0]


def test_counted_imbalance_at_w8():
    world, n = 8, 512
    c = n // world
    zig = work_model("zigzag", world=world, seq_len=n, causal=True)["imbalance"]
    stripe = work_model("striped", world=world, seq_len=n, causal=True)["imbalance"]
    ring = work_model("ring", world=world, seq_len=n, causal=True)["imbalance"]
    assert zig == 1.0
    assert stripe <= 1 + 1 / c + 1e-3
    assert stripe == pytest.approx(world * (c + 1) / (world * c + 1))
    # contiguous ring: ((c+1) + 2(P-1)c) / (Pc+1), docs/algorithms.md §4 (1.873 at P=8)
    assert ring == pytest.approx(((c + 1) + 2 * (world - 1) * c) / (world * c + 1))
    assert round(ring, 3) == 1.873
    assert work_model("ulysses", world=world, seq_len=n, causal=True)["imbalance"] == 1.0
    assert work_model("allgather", world=world, seq_len=n, causal=True)["imbalance"] == 1.0


def test_work_totals_equal_the_mask():
    for layout in ("contiguous", "zigzag", "striped"):
        t = work_table(layout, 48, 3, True)
        assert sum(map(sum, t)) == 48 * 49 // 2
        assert imbalance(t) >= 1.0

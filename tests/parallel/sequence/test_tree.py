"""Tree decoding (and the ring baseline) over a sharded KV cache against single-device float64 attention."""

import re

import pytest
import torch

from longctx.launch import run
from longctx.parallel.sequence.tree import ShardedKVCache, ring_decode_comm_model, tree_comm_model
from tests.support.backends import check_ran

from ._tree_workers import expect_decode_errors, run_cases

TOL = 1e-5


def _cases(world):
    short = max(1, world - 1)  # shorter than the world: some ranks hold nothing
    base = dict(sq=1, h=4, d=8)
    return [
        dict(base, b=1, t=37, hkv=4, chunks=[20, 1, 1, 5, 10]),
        dict(base, b=3, t=37, hkv=2, chunks=[37]),
        dict(base, b=3, t=short, hkv=1, chunks=[1] * short),
        dict(base, b=1, t=2, hkv=2),
        dict(base, b=2, t=29, hkv=2, sq=3, causal_new=True, chunks=[26, 3]),
        dict(base, b=3, t=37, hkv=2, collectives=1),
        dict(base, b=2, t=40, hkv=2, seed=5),
        dict(base, b=2, t=400, hkv=2, seed=6),
        dict(base, b=2, t=23, hkv=2, dtype=torch.float64),
        dict(base, b=2, t=37, hkv=2, dv=4, chunks=[20, 17]),  # values narrower and wider than keys
        dict(base, b=2, t=37, hkv=2, dv=12, sq=2, causal_new=True, chunks=[30, 7]),
        dict(kind="ragged", b=3, s=6, sq=2, h=4, hkv=2, d=8),
        dict(kind="empty"),
    ]


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_tree_decode_exact(world):
    cases = _cases(world)
    results = run(run_cases, world, args=(cases,), timeout=240.0)
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases, per_rank):
            label = (world, rank, case)
            kind = case.get("kind", "decode")
            if kind == "ragged":
                assert r["err"] <= TOL, (label, r)
                continue
            if kind == "empty":
                assert r["ok"], label
                continue
            tol = 1e-12 if case.get("dtype") == torch.float64 else TOL
            assert r["positions_ok"], label
            assert r["tree_err"] <= tol and r["lse_err"] <= tol and r["lse_inf_ok"], (label, r)
            assert r["out_dtype"] == str(case.get("dtype", torch.float32))
            check_ran(r["backends"], "auto", label=label, must_run=rank < case["t"])  # rank < t: a key to attend
            assert r["tree_bytes"] == r["tree_model"]["fwd_bytes"], (label, r)
            assert r["tree_calls"] == r["tree_model"]["fwd_calls"], (label, r)
            if not case.get("causal_new"):
                assert r["ring_err"] <= tol and r["ring_err_auto"] <= tol, (label, r)
                assert r["ring_bytes"] == r["ring_model"]["fwd_bytes"] == r["ring_auto_bytes"], (label, r)
                assert r["ring_calls"] == r["ring_model"]["fwd_calls"], (label, r)
    # the tree moves the same bytes for a 40- and a 400-token context; the ring grows with it
    r40, r400 = results[0][6], results[0][7]
    assert r40["tree_bytes"] == r400["tree_bytes"]
    if world > 1:
        assert r40["tree_bytes"] > 0 and r400["ring_bytes"] > 5 * r40["ring_bytes"]


def test_cache_round_robin_without_process_group():
    caches = [ShardedKVCache(rank=r, world=3) for r in range(3)]
    k = torch.arange(2 * 11 * 1 * 1, dtype=torch.float32).view(2, 11, 1, 1)
    for c in caches:
        c.prefill(k[:, :4], k[:, :4])
        c.append(k[:, 4:5], k[:, 4:5])
        c.append(k[:, 5:11], k[:, 5:11])
    for r, c in enumerate(caches):
        pos = c.global_positions()
        assert pos.tolist() == list(range(r, 11, 3))
        assert torch.equal(c.k, k[:, pos]) and torch.equal(c.v, k[:, pos])
        assert c.shard_lengths() == [4, 4, 3]
    with pytest.raises(ValueError, match="kv_heads"):
        caches[0].append(torch.zeros(2, 1, 2, 1), torch.zeros(2, 1, 2, 1))
    c = ShardedKVCache(rank=1, world=3)
    with pytest.raises(ValueError, match="striped"):
        c.prefill_local(k[:, :2], k[:, :2], total=11)
    c.prefill_local(k[:, 1:11:3], k[:, 1:11:3], total=11)
    assert c.global_positions().tolist() == [1, 4, 7, 10]


def test_models():
    # all-reduce max of (B, Sq, H) fp32 lse + all-reduce sum of (B, Sq, H, D+1) fp32
    assert tree_comm_model(4, 2, 1, 8, 64, 2) == {"fwd_bytes": 2 * 3 * 16 * 4 // 4 + 2 * 3 * 16 * 65 * 4 // 4,
                                                  "fwd_calls": 2}
    assert tree_comm_model(1, 2, 1, 8, 64, 2)["fwd_bytes"] == 0
    assert ring_decode_comm_model(4, 2, 100, 2, 64, 2) == {"fwd_bytes": 3 * 2 * 2 * 100 * 2 * 64 * 2,
                                                           "fwd_calls": 3}
    # K 64 wide and V 32 wide in one buffer
    assert ring_decode_comm_model(4, 2, 100, 2, 64, 2, v_head_dim=32) == {
        "fwd_bytes": 3 * 2 * 100 * 2 * (64 + 32) * 2, "fwd_calls": 3}


# Bad decode calls at W=3: batch 2, 2 new tokens, 4 cache slots per rank (a striped 12-token cache). Every
# pattern holds the argument's name and the fix the message offers.
_LENGTHS = r"lengths must hold one valid-token count in \[0, 4\] per batch row \(2 rows\), got {}; pass the number " \
    r"of filled cache slots of each row of this shard"
_POSITIONS = r"q_positions needs 2 entries \(one per new token\) and k_positions 4 \(one per key of this shard\), " \
    r"got {} and {}; pass the global positions .*ShardedKVCache.decode passes both"
_NEEDS_POSITIONS = r"causal_new=True needs q_positions .* and k_positions .*; ShardedKVCache.decode passes both"
_COLLECTIVES = r"collectives must be 1 \(all-gather \+ local merge\) or 2 \(max \+ fused sum\), got 3"
_SHARD_LENS = r"shard_lens must list all 3 ranks' shard lengths with this rank's = 4, got {}; " \
    r"pass ShardedKVCache.shard_lengths\(\), or None to gather them"
DECODE_ERRORS = [
    (dict(fn="tree", lengths=[1, 2, 3]), _LENGTHS.format(r"\[1, 2, 3\]")),  # one count per row
    (dict(fn="tree", lengths=[1, -1]), _LENGTHS.format(r"\[1, -1\]")),  # >= 0
    (dict(fn="tree", lengths=[1, 5]), _LENGTHS.format(r"\[1, 5\]")),  # <= the shard's slots
    (dict(fn="tree", causal_new=True, k_positions="own"), _NEEDS_POSITIONS),
    (dict(fn="tree", causal_new=True, q_positions=[10, 11]), _NEEDS_POSITIONS),
    (dict(fn="tree", causal_new=True, q_positions=[9, 10, 11], k_positions="own"), _POSITIONS.format(3, 4)),
    (dict(fn="tree", causal_new=True, q_positions=[10, 11], k_positions=[0, 3]), _POSITIONS.format(2, 2)),
    (dict(fn="tree", key_start=[0, 1]), r"key_start hides keys by their global position: give k_positions"),
    (dict(fn="tree", collectives=3), _COLLECTIVES),
    (dict(fn="tree", collectives=3, group="self"), _COLLECTIVES),  # a world of one checks it too
    (dict(fn="ring", shard_lens=[4, 4]), _SHARD_LENS.format(r"\[4, 4\]")),  # one length per rank
    (dict(fn="ring", shard_lens=[5, 5, 5]), _SHARD_LENS.format(r"\[5, 5, 5\]")),  # this rank's must match
]


def test_decode_errors():
    results = run(expect_decode_errors, 3, args=([c for c, _ in DECODE_ERRORS],), timeout=60.0)
    assert len(results) == 3
    for rank, per_rank in enumerate(results):
        *errors, after = per_rank
        assert after == ("after", "3.0"), (rank, after)
        for (call, pattern), (got_type, msg) in zip(DECODE_ERRORS, errors, strict=True):
            assert got_type == "ValueError", (rank, call, got_type, msg)
            assert re.search(pattern, msg), (rank, call, pattern, msg)


def test_cache_errors():
    """ShardedKVCache refusals that need no process group (decode refuses before it communicates)."""
    with pytest.raises(ValueError, match=r"rank 3 is outside a world of 3 ranks; pass 0 <= rank < world"):
        ShardedKVCache(rank=3, world=3)
    with pytest.raises(ValueError, match=r"rank -1 is outside a world of 2 ranks; pass 0 <= rank < world"):
        ShardedKVCache(rank=-1, world=2)
    c = ShardedKVCache(rank=1, world=2)
    q = torch.randn(1, 1, 2, 4)
    with pytest.raises(ValueError, match=r"the cache is empty on every rank; prefill\(\) or append\(\) before decode"):
        c.decode(q)
    shape = r"k_new and v_new must both be \(batch, n, kv_heads, head_dim\) \(v's head_dim may differ\), got {}"
    with pytest.raises(ValueError, match=shape.format(r"\(1, 3, 2\) and \(1, 3, 2\)")):
        c.append(torch.zeros(1, 3, 2), torch.zeros(1, 3, 2))
    with pytest.raises(ValueError, match=shape.format(r"\(1, 3, 2, 4\) and \(1, 2, 2, 4\)")):
        c.append(torch.zeros(1, 3, 2, 4), torch.zeros(1, 2, 2, 4))
    c.prefill(torch.zeros(1, 5, 2, 4), torch.zeros(1, 5, 2, 4))
    assert c.total == 5 and c.k.shape == (1, 2, 2, 4)  # the refused appends stored nothing
    mismatch = r"do not match the cache's \(batch, \*, kv_heads, head_dim\) = .*; call reset\(\) for a new batch"
    for k_new in (torch.zeros(2, 1, 2, 4), torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 2, 4, dtype=torch.float64)):
        with pytest.raises(ValueError, match=mismatch):  # batch, kv heads, dtype
            c.append(k_new, k_new)
    with pytest.raises(ValueError, match=mismatch):  # values of another width than the cached ones
        c.append(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 6))
    with pytest.raises(ValueError, match="ring_decode has no causal_new; use strategy='tree'"):
        c.decode(q, strategy="ring", causal_new=True)
    with pytest.raises(ValueError, match=r"unknown decode strategy 'spiral'; choose 'tree' or 'ring'"):
        c.decode(q, strategy="spiral")
    with pytest.raises(ValueError, match=r"a 5-token prompt puts 2 tokens on rank 1 of 2 \(striped layout\), got "
                       r"k/v with 3/3; pass this rank's tokens 1, 3, \.\.\. of the prompt"):
        c.prefill_local(torch.zeros(1, 3, 2, 4), torch.zeros(1, 3, 2, 4), total=5)

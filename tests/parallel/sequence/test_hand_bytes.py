"""Communication bytes against numbers derived by hand, not by the product.

Three links, so a bug in a helper shared by the schedules and their models (check_heads, dilated's head
packing) cannot hide: literal tables pin the hand formulas of _hand_bytes (which imports nothing from
longctx); the product's closed-form models must equal those formulas over a wide grid; and the Comm
counters of real distributed runs must equal them too (here for every strategy and for decoding, dilated
in test_dilated, and every exactness case of the ring/allgather/ulysses/hybrid tests through _cases.check).
"""

import itertools

import pytest
import torch

from longctx.launch import run
from longctx.parallel import STRATEGIES, comm_model
from longctx.parallel.sequence.dilated import check_pattern, dilated_comm_model, sparse_kv_heads
from longctx.parallel.sequence.tree import ring_decode_comm_model, tree_comm_model

from ._hand_bytes import (
    KEYS,
    RING_FAMILY,
    distinct_kv_heads,
    expected,
    expected_dilated,
    expected_ring_decode,
    expected_tree,
)
from ._hand_bytes_workers import run_cases

MIB = 2**20

# ------------------------------------------------------------------------------------------ literal tables
# The exactness grid's shapes (_cases.grid): b=2, n=8W, h = 2W if W < 4 else W, d=8; per row the
# (fwd, bwd) bytes one rank sends for MHA (hkv=h), GQA (hkv=h/2), MQA (hkv=1). Hybrid (R, U): h=2U,
# hkv in (h, U, 1), as in test_hybrid. Worked by hand, e.g. fp32:
#   ring W=2 MHA: shard c=8, K/V = 2*b*c*hkv*d*e = 2*2*8*4*8*4 = 4096 sent once; bwd 4096 + 2 hops of the
#     fp32 dK/dV (4096 each) = 12288.
#   ulysses W=2 GQA (h=4, hkv=2): q/out in 2*8*4*8*4 = 2048 bytes, half sent, twice: 2048; k/v (2 heads:
#     no replication, 2 % 2 == 0) 1024 bytes, half sent, twice: 1024; total 3072 (4096 if the 2 KV heads
#     were needlessly replicated to 4).
#   ulysses W=3 MQA (h=6): q/out 3072 * 2/3 * 2 = 4096; k/v replicated to 3 heads, 1536 * 2/3 * 2 = 2048.
#   hybrid (2, 4) MHA (h=8, N=64): ulysses over 4 on c=8 (q 4096 * 3/4 * 2 + k/v the same) = 12288, then the
#     ring over 2 on 32 tokens with 8/4 = 2 KV heads: 2*2*32*2*8*4 = 8192; fwd 20480; bwd 12288 + 8192 + 2 *
#     8192 (fp32 dK/dV, 2 hops) = 36864.
FP32 = {
    ("ring", 2): ((4096, 12288), (2048, 6144), (1024, 3072)),
    ("ring", 3): ((12288, 30720), (6144, 15360), (2048, 5120)),
    ("ring", 4): ((12288, 28672), (6144, 14336), (3072, 7168)),
    ("ring", 8): ((57344, 122880), (28672, 61440), (7168, 15360)),
    ("allgather", 2): ((4096, 8192), (2048, 4096), (1024, 2048)),
    ("allgather", 3): ((12288, 24576), (6144, 12288), (2048, 4096)),
    ("allgather", 4): ((12288, 24576), (6144, 12288), (3072, 6144)),
    ("allgather", 8): ((57344, 114688), (28672, 57344), (7168, 14336)),
    ("ulysses", 2): ((4096, 4096), (3072, 3072), (3072, 3072)),
    ("ulysses", 3): ((8192, 8192), (6144, 6144), (6144, 6144)),
    ("ulysses", 4): ((6144, 6144), (6144, 6144), (6144, 6144)),
    ("ulysses", 8): ((14336, 14336), (14336, 14336), (14336, 14336)),
    ("hybrid", 1, 2): ((4096, 4096), (3072, 3072), (3072, 3072)),
    ("hybrid", 2, 2): ((8192, 16384), (5120, 9216), (5120, 9216)),
    ("hybrid", 4, 2): ((16384, 32768), (9216, 17408), (9216, 17408)),
    ("hybrid", 2, 4): ((20480, 36864), (13312, 21504), (13312, 21504)),
}
# bf16 (e=2): K/V, q and out halve; dK/dV stay fp32 (acc 4)
BF16 = {
    ("ring", 2): ((2048, 10240), (1024, 5120), (512, 2560)),
    ("ring", 3): ((6144, 24576), (3072, 12288), (1024, 4096)),
    ("ring", 4): ((6144, 22528), (3072, 11264), (1536, 5632)),
    ("ring", 8): ((28672, 94208), (14336, 47104), (3584, 11776)),
    ("allgather", 2): ((2048, 6144), (1024, 3072), (512, 1536)),
    ("allgather", 3): ((6144, 18432), (3072, 9216), (1024, 3072)),
    ("allgather", 4): ((6144, 18432), (3072, 9216), (1536, 4608)),
    ("allgather", 8): ((28672, 86016), (14336, 43008), (3584, 10752)),
    ("ulysses", 2): ((2048, 2048), (1536, 1536), (1536, 1536)),
    ("ulysses", 3): ((4096, 4096), (3072, 3072), (3072, 3072)),
    ("ulysses", 4): ((3072, 3072), (3072, 3072), (3072, 3072)),
    ("ulysses", 8): ((7168, 7168), (7168, 7168), (7168, 7168)),
    ("hybrid", 1, 2): ((2048, 2048), (1536, 1536), (1536, 1536)),
    ("hybrid", 2, 2): ((4096, 12288), (2560, 6656), (2560, 6656)),
    ("hybrid", 4, 2): ((8192, 24576), (4608, 12800), (4608, 12800)),
    ("hybrid", 2, 4): ((10240, 26624), (6656, 14848), (6656, 14848)),
}
# (fwd calls, bwd calls): ring W-1 K/V sends, then W-1 K/V + W dK/dV sends; allgather one gather, then a
# gather and a reduce-scatter; ulysses four all-to-alls each way; hybrid: 4 (U > 1) plus its ring's
CALLS = {"ring": lambda w: (w - 1, 2 * w - 1), "allgather": lambda w: (1, 2), "ulysses": lambda w: (4, 4)}
HYBRID_CALLS = {(1, 2): (4, 4), (2, 2): (5, 7), (4, 2): (7, 11), (2, 4): (5, 7)}


def _grid_rows():
    """(strategy, shape kwargs, MHA/GQA/MQA index, table key) for every literal row."""
    for key in FP32:
        if key[0] == "hybrid":
            ring, uly = key[1:]
            world, h, kvs, names = ring * uly, 2 * uly, (2 * uly, uly, 1), ("hybrid",)
        else:
            world, uly = key[1], None
            h = 2 * world if world < 4 else world
            kvs, names = (h, h // 2, 1), RING_FAMILY if key[0] == "ring" else (key[0],)
        for i, hkv in enumerate(kvs):
            for name in names:
                yield name, dict(world=world, batch=2, seq_len=8 * world, heads=h, kv_heads=hkv, head_dim=8,
                                 ulysses=uly), i, key


def test_hand_formulas_reproduce_the_literal_tables():
    for name, shape, i, key in _grid_rows():
        calls = HYBRID_CALLS[key[1:]] if name == "hybrid" else CALLS[key[0]](shape["world"])
        for e, table, scale in ((4, FP32, 1), (2, BF16, 1), (8, FP32, 2)):  # fp64: e and acc both double fp32
            fwd, bwd = table[key][i]
            want = {"fwd_bytes": fwd * scale, "fwd_calls": calls[0], "bwd_bytes": bwd * scale, "bwd_calls": calls[1]}
            assert expected(name, dtype_bytes=e, **shape) == want, (name, shape, e)


def test_docs_worked_example():
    """docs/algorithms.md §12.3: W=8, B=1, N=65536, H=32, H_kv=8, D=128, bf16, in MiB."""
    table = {("ring", None): (224, 7, 736, 15), ("zigzag", None): (224, 7, 736, 15),
             ("allgather", None): (224, 1, 672, 2), ("ulysses", None): (140, 4, 140, 4),
             ("hybrid", 4): (152, 5, 280, 7), ("hybrid", 2): (176, 7, 432, 11)}
    for (s, uly), (fwd, fc, bwd, bc) in table.items():
        got = expected(s, world=8, batch=1, seq_len=65536, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2,
                       ulysses=uly)
        assert got == {"fwd_bytes": fwd * MIB, "fwd_calls": fc, "bwd_bytes": bwd * MIB, "bwd_calls": bc}, s


# Dilated, by hand. (kwargs, (fwd bytes, fwd calls, bwd bytes, bwd calls)).
#  a) W=2, l=8, H=6, H_kv=2 (G=3), pattern (16, 2) spans g=2 ranks: class 0 (heads 0, 2, 4) reads kv heads
#     {0, 0, 1} -> 2 distinct, class 1 (1, 3, 5) {0, 1, 1} -> 2: Hs=4, chunk 2*2*(8/2)*4*8 = 512 fp32
#     elements = 2048 bytes each way (3072 if all 6 wanted heads were sent); (4, 1) is local.
#  b) W=2, H=4, H_kv=2, gathered rate 1: kv heads {0, 0, 1, 1} -> 2: 2*2*8*2*8*4 = 2048 (4096 undeduplicated)
#  c) W=4, l=8, H=4, H_kv=2, (16, 2): g=2, Hs=2+2 -> 2*2*4*4*8*4 = 2048; (64 -> 32, 4): g=4, one head per
#     class, Hs=4 -> 3 * 2*2*2*4*8*4 = 3072; both bwd (fp32) the same; (4, 1) and (8, 1) are local.
#  d) as c) in bf16: forward halves, backward stays fp32.
#  e) W=8, l=8, H=8, MQA: (32, 2) g=4, Hs=2: 3 * 2*1*4*2*8*4 = 1536; (64, 4) g=8, Hs=4: 7 * 2*1*2*4*8*4 = 3584.
#  f) docs §12.5: N=65536, W=8, w=2048..65536, r=1..32, H=32, H_kv=8, D=128, bf16: 16+24+28 MiB forward.
_D = dict(batch=2, head_dim=8, dtype_bytes=4)
DILATED = [
    (dict(_D, world=2, seq_len=16, heads=6, kv_heads=2, segment_lengths=[4, 16], dilation_rates=[1, 2]),
     (2048, 1, 2048, 1)),
    (dict(_D, world=2, seq_len=16, heads=4, kv_heads=2, segment_lengths=[4, 16], dilation_rates=[1, 1]),
     (2048, 1, 2048, 1)),
    (dict(_D, world=4, seq_len=32, heads=4, kv_heads=2, segment_lengths=[4, 8, 16, 64], dilation_rates=[1, 1, 2, 4]),
     (5120, 2, 5120, 2)),
    (dict(_D, world=4, seq_len=32, heads=4, kv_heads=2, segment_lengths=[4, 8, 16, 64], dilation_rates=[1, 1, 2, 4],
          dtype_bytes=2), (2560, 2, 5120, 2)),
    (dict(_D, world=8, seq_len=64, heads=8, kv_heads=1, segment_lengths=[8, 32, 64], dilation_rates=[1, 2, 4],
          batch=1), (5120, 2, 5120, 2)),
    (dict(world=8, batch=1, seq_len=65536, heads=32, kv_heads=8, head_dim=128, dtype_bytes=2,
          segment_lengths=[2048 * 2**i for i in range(6)], dilation_rates=[2**i for i in range(6)]),
     (68 * MIB, 3, 136 * MIB, 3)),
]


def test_dilated_literal_table():
    for kw, want in DILATED:
        assert tuple(expected_dilated(**kw)[k] for k in KEYS) == want, kw
    # §10.3: H=32, H_kv=8: 8, 16, 32, 32, ... distinct heads for r = 1, 2, 4, 8, ...; MHA: H for every r
    assert [distinct_kv_heads(32, 8, r) for r in (1, 2, 4, 8, 16, 32, 64)] == [8, 16, 32, 32, 32, 32, 32]
    assert [distinct_kv_heads(6, 6, r) for r in (1, 2, 4, 8)] == [6] * 4
    assert [distinct_kv_heads(6, 2, r) for r in (1, 2, 3, 6)] == [2, 4, 6, 6]


# Decoding, by hand (phase 'decode'). (kwargs, (bytes, calls)).
#   tree, W=3, B=2, Sq=1, H=4, D=8 (rows = 8), fp32: all-reduce max of 8*4 = 32 bytes -> floor(64*2/3) = 42,
#     all-reduce sum of 8*9*4 = 288 bytes -> 384: 426 in 2 calls; 1 collective: 2 * 288 = 576.
#   docs §12.4: W=8, B=Sq=1, H=32, D=128, bf16 (combine in fp32): 29,120 (2 calls) or 115,584 (1 call).
TREE = [
    (dict(world=3, batch=2, q_len=1, heads=4, head_dim=8, dtype_bytes=4), (426, 2)),
    (dict(world=3, batch=2, q_len=1, heads=4, head_dim=8, dtype_bytes=4, collectives=1), (576, 1)),
    (dict(world=8, batch=1, q_len=1, heads=32, head_dim=128, dtype_bytes=2), (29120, 2)),
    (dict(world=8, batch=1, q_len=1, heads=32, head_dim=128, dtype_bytes=2, collectives=1), (115584, 1)),
    (dict(world=1, batch=1, q_len=1, heads=32, head_dim=128, dtype_bytes=2), (0, 0)),
]
#   ring decode, W=3, T=37 (longest shard 13), B=2, H_kv=2, D=8, fp32: 2 hops * 2*2*13*2*8*4 = 6656;
#   docs §12.4: W=8, T=65536 (8192 per rank), H_kv=8, D=128, bf16: 7 * 2*8192*8*128*2 = 224 MiB.
RING_DECODE = [
    (dict(world=3, batch=2, context=37, kv_heads=2, head_dim=8, dtype_bytes=4), (6656, 2)),
    (dict(world=3, batch=2, context=2, kv_heads=2, head_dim=8, dtype_bytes=4), (512, 2)),
    (dict(world=3, batch=2, context=0, kv_heads=2, head_dim=8, dtype_bytes=4), (0, 0)),
    (dict(world=8, batch=1, context=65536, kv_heads=8, head_dim=128, dtype_bytes=2), (224 * MIB, 7)),
]


def test_decode_literal_tables():
    for fn, table in ((expected_tree, TREE), (expected_ring_decode, RING_DECODE)):
        for kw, (nbytes, calls) in table:
            assert fn(**kw) == {"fwd_bytes": nbytes, "fwd_calls": calls}, kw


# ------------------------------------------------------------------------------------------ product models
def _divisors(x):
    return [k for k in range(1, x + 1) if x % k == 0]


def test_strategy_models_equal_hand_formulas():
    """comm_model (cost.py via the registry) over a wide grid, invalid head splits included (both refuse)."""
    n_checked = 0
    for world, h, b, (d, e) in itertools.product(range(1, 9), range(1, 17), (1, 3), ((8, 4), (5, 2), (3, 8))):
        n = 2 * world * 3  # a multiple of every layout's divisor (zigzag: 2W; hybrid: lcm(2R, W))
        for hkv in _divisors(h):
            for s in STRATEGIES:
                for uly in (_divisors(world) if s == "hybrid" else [None]):
                    kw = dict(world=world, batch=b, seq_len=n, heads=h, kv_heads=hkv, head_dim=d, dtype_bytes=e,
                              ulysses=uly)
                    try:
                        model = comm_model(s, **kw)
                    except ValueError:
                        with pytest.raises(ValueError):
                            expected(s, **kw)
                        continue
                    assert model == expected(s, **kw), (s, kw)
                    n_checked += 1
    assert n_checked > 5000


def test_dilated_model_equals_hand_formula():
    for h in range(1, 25):
        for hkv in _divisors(h):
            for r in range(1, 2 * h + 2):
                assert sparse_kv_heads(h, hkv, r) == distinct_kv_heads(h, hkv, r), (h, hkv, r)
    patterns = [([4, 8, 16, 64], [1, 1, 2, 4]), ([8, 32], [2, 4]), ([2, 4, 16], [1, 2, 8]), ([16, 64], [1, 1]),
                ([4, 16, 64], [1, 2, 4]), ([32, 64, 128], [2, 4, 8]), ([8, 16, 32, 64, 128], [1, 2, 4, 8, 16])]
    n_checked = 0
    for world, n_local, (ws, rs), h, b, e in itertools.product((1, 2, 4, 8), (8, 16, 32), patterns, (1, 2, 4, 6, 8),
                                                               (1, 2), (2, 4, 8)):
        n = n_local * world
        try:
            check_pattern(ws, rs, n, world)
        except ValueError:
            continue
        for hkv in _divisors(h):
            model = dilated_comm_model(world, b, n, h, 8, e, ws, rs, kv_heads=hkv)
            hand = expected_dilated(world=world, batch=b, seq_len=n, heads=h, kv_heads=hkv, head_dim=8,
                                    dtype_bytes=e, segment_lengths=ws, dilation_rates=rs)
            assert model == hand, (world, n, ws, rs, h, hkv, e)
            n_checked += model["fwd_calls"] > 0
    assert n_checked > 500


def test_decode_models_equal_hand_formulas():
    for world, b, sq, h, d, e in itertools.product(range(1, 9), (1, 3), (1, 2, 5), (1, 4, 6), (8, 5), (2, 4, 8)):
        for coll in (1, 2):
            kw = dict(world=world, batch=b, q_len=sq, heads=h, head_dim=d, dtype_bytes=e, collectives=coll)
            assert tree_comm_model(world, b, sq, h, d, e, collectives=coll) == expected_tree(**kw), kw
        for t, hkv in itertools.product((0, 1, world - 1, 37, 64), (1, 2)):
            model = ring_decode_comm_model(world, b, -(-t // world), hkv, d, e)
            assert model == expected_ring_decode(world=world, batch=b, context=t, kv_heads=hkv, head_dim=d,
                                                 dtype_bytes=e), (world, b, t, hkv, d, e)


# ------------------------------------------------------------------------------------------ real counters
def _attention_cases(world):
    h = 2 * world if world < 4 else world
    cases = [dict(strategy=s, b=2, n=8 * world, h=h, hkv=hkv, d=8, dtype=torch.float32, causal=i % 2 == 0)
             for s in STRATEGIES if s != "hybrid" for i, hkv in enumerate((h, h // 2, 1))]
    cases += [dict(c, dtype=torch.bfloat16) for c in cases if c["hkv"] == h // 2 and c["strategy"] in
              ("zigzag", "allgather", "ulysses")]
    if world == 4:  # hybrid 2 x 2 with h = 2U as in test_hybrid: the GQA case is where check_heads matters
        cases += [dict(strategy="hybrid", mesh=(2, 2), b=2, n=32, h=4, hkv=hkv, d=8, dtype=dt)
                  for hkv in (4, 2, 1) for dt in (torch.float32, torch.bfloat16)]
    return cases


def _decode_cases():
    base = dict(kind="decode", b=2, t=37, sq=1, h=4, hkv=2, d=8, dtype=torch.float32)
    return [base, dict(base, sq=3, hkv=1, dtype=torch.bfloat16), dict(base, t=2, dtype=torch.float64)]


@pytest.mark.parametrize("world", [3, 4])
def test_counters_equal_hand_formulas(world):
    """Every strategy's forward/backward counters and one decode step's, from real runs on `world` ranks
    (one launch), against the hand formulas: W=3 has odd floors and a replicated Ulysses K/V (MQA)."""
    cases = _attention_cases(world) + _decode_cases()
    results = run(run_cases, world, args=(cases,), timeout=240.0)
    for rank, per_rank in enumerate(results):
        for case, got in zip(cases, per_rank):
            label = (world, rank, case)
            e = torch.tensor([], dtype=case["dtype"]).element_size()
            if case.get("kind") == "decode":
                for coll in (1, 2):
                    want = expected_tree(world=world, batch=case["b"], q_len=case["sq"], heads=case["h"],
                                         head_dim=case["d"], dtype_bytes=e, collectives=coll)
                    assert got[f"tree{coll}"] == {"decode_bytes": want["fwd_bytes"],
                                                  "decode_calls": want["fwd_calls"]}, label
                want = expected_ring_decode(world=world, batch=case["b"], context=case["t"], kv_heads=case["hkv"],
                                            head_dim=case["d"], dtype_bytes=e)
                assert got["ring"] == {"decode_bytes": want["fwd_bytes"], "decode_calls": want["fwd_calls"]}, label
                continue
            want = expected(case["strategy"], world=world, batch=case["b"], seq_len=case["n"], heads=case["h"],
                            kv_heads=case["hkv"], head_dim=case["d"], dtype_bytes=e,
                            ulysses=case["mesh"][1] if "mesh" in case else None)
            assert got == want, (label, got, want)

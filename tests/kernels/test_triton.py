"""The triton backend against the float64 reference: every mask kind, GQA/MQA, fp32 and bf16, band skipping.

Without CUDA the kernels run under the Triton interpreter (slow: shapes are tiny and tiles are 16 wide,
so even these shapes cross several tiles and hit partial, full and skipped ones). The opt-in environment
(TRITON_INTERPRET=1, LONGCTX_TRITON_ON_CPU=1) is set by a module fixture and restored afterwards rather
than at import time: set globally it would let `auto` pick triton on CPU in every other test module.
That works because triton_backend imports the kernels (where TRITON_INTERPRET is read) on first call.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.support.backends import HAS_TRITON

# Not importorskip: importing triton here, before the module fixture sets TRITON_INTERPRET, would fix its
# own jit functions to compiled mode, and the interpreter could not run them afterwards.
if not HAS_TRITON:
    pytest.skip("triton is not installed (pip install 'longctx[triton]')", allow_module_level=True)

import longctx.kernels as K  # noqa: E402
from longctx.kernels import Mask, triton_backend  # noqa: E402
from tests.support import oracle  # noqa: E402
from tests.support.backends import check_ran, report  # noqa: E402

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"
_ENV = ("TRITON_INTERPRET", "LONGCTX_TRITON_ON_CPU", "LONGCTX_TRITON_AUTOTUNE")


@pytest.fixture(autouse=True, scope="module")
def _opt_in():
    saved = {n: os.environ.get(n) for n in _ENV}
    if not CUDA:
        os.environ["TRITON_INTERPRET"] = "1"
        os.environ["LONGCTX_TRITON_ON_CPU"] = "1"
    os.environ["LONGCTX_TRITON_AUTOTUNE"] = "0"  # fixed tiles: no GPU autotuning for tiny shapes
    yield
    for n, val in saved.items():
        if val is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = val


def _docs(b, ids):
    return torch.tensor([ids] * b, device=DEV)


def _doc_mask(b, sq, sk, causal):
    qd = [i * 3 // sq for i in range(sq)]  # 3 documents over the queries
    kd = [min(3, j * 4 // sk) for j in range(sk)]  # 4 over the keys: doc 3 has no query, and...
    kd = [d if d != 1 else 5 for d in kd]  # ...doc 1 no key, so its query rows are fully masked
    return Mask.documents(_docs(b, qd), _docs(b, kd), causal=causal)


# id, (batch, sq, sk, heads, kv_heads, head_dim), mask factory
CASES = [
    ("none", (1, 13, 21, 2, 2, 32), lambda b, sq, sk: Mask.none()),
    ("causal_bottom_right", (1, 13, 21, 2, 2, 32), lambda b, sq, sk: Mask.causal()),
    ("causal_off0", (1, 13, 21, 2, 2, 32), lambda b, sq, sk: Mask.causal(0)),
    ("causal_off-3", (1, 21, 13, 2, 2, 32), lambda b, sq, sk: Mask.causal(-3)),  # rows 0..2 see nothing
    ("causal_off+3", (1, 21, 13, 2, 2, 32), lambda b, sq, sk: Mask.causal(3)),
    ("shifted_causal", (1, 19, 19, 2, 2, 32), lambda b, sq, sk: Mask.shifted_causal()),  # row 0 empty
    ("window_causal", (1, 35, 35, 2, 2, 32), lambda b, sq, sk: Mask.sliding_window(5)),
    ("window_both_sides", (1, 13, 37, 2, 2, 32), lambda b, sq, sk: Mask.sliding_window(4, causal=False)),
    ("band_outside", (1, 13, 21, 2, 2, 32), lambda b, sq, sk: Mask(left=-30, right=40)),  # nothing allowed
    ("documents_causal", (2, 21, 21, 2, 2, 32), lambda b, sq, sk: _doc_mask(b, sq, sk, True)),
    ("documents_shared_ids", (2, 13, 21, 2, 2, 32), lambda b, sq, sk: _doc_mask(1, sq, sk, False)),
    ("gqa", (1, 13, 21, 4, 2, 32), lambda b, sq, sk: Mask.causal()),
    ("mqa_window", (1, 21, 21, 4, 1, 32), lambda b, sq, sk: Mask.sliding_window(6, causal=False)),
    ("head_dim_64", (1, 13, 21, 2, 1, 64), lambda b, sq, sk: Mask.causal()),
    ("head_dim_24_padded", (1, 13, 21, 2, 2, 24), lambda b, sq, sk: Mask.none()),
]


def _inputs(shape, dtype, seed=0):
    b, sq, sk, h, hkv, d = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(DEV, dtype)  # noqa: E731
    return mk(b, sq, h, d), mk(b, sk, hkv, d), mk(b, sk, hkv, d), mk(b, sq, h, d)


def _exact(q, k, v, do, mask):
    """The independent float64 oracle (tests/support/oracle.py), on the device the kernel ran on."""
    out, lse, grads = oracle.attention(q.cpu(), k.cpu(), v.cpu(), do=do.cpu(), **oracle.band(mask))
    return out.to(DEV), lse.to(DEV), tuple(g.to(DEV) for g in grads)


def _run(backend, q, k, v, do, mask):
    K.reset_calls()
    out, lse = K.forward(q, k, v, mask=mask, backend=backend)
    res = out, lse, K.backward(do, q, k, v, out, lse, mask=mask, backend=backend)
    check_ran(report(), backend, DEV)
    return res


def _flat(res):
    return res[0], *res[2]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check_lse(lse, ref):
    # Empty rows must be exactly -inf (the merge identity), never NaN or a large finite number.
    assert not lse.isnan().any()
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref))
    fin = torch.isfinite(ref)
    assert _err(lse[fin], ref[fin]) <= 1e-5


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_fp32_matches_float64_reference(case):
    _, shape, make = case
    mask = make(shape[0], shape[1], shape[2])
    q, k, v, do = _inputs(shape, torch.float32)
    out, lse, grads = _run("triton", q, k, v, do, mask)
    r_out, r_lse, r_grads = _exact(q, k, v, do, mask)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == r_lse.shape
    _check_lse(lse, r_lse)
    assert _err(out, r_out) <= 1e-5
    for name, g, r in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.shape == r.shape and g.dtype == torch.float32
        assert not g.isnan().any(), name
        assert _err(g, r) <= 1e-5, (name, _err(g, r))
    empty = torch.isneginf(r_lse).transpose(1, 2)  # (B, Sq, H)
    assert (out[empty] == 0).all() and (grads[0][empty] == 0).all()


BF16_CASES = [CASES[i] for i in (1, 9, 12)]


@pytest.mark.parametrize("precise", [False, True], ids=["fast", "precise"])
@pytest.mark.parametrize("case", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_error_close_to_reference_backend(case, precise, monkeypatch):
    """bf16 against the exact result, relative to the reference backend's own bf16 error (it keeps all math
    in fp32 and rounds once, at the output). By default the kernel rounds P and dS to bf16 for the
    tensor-core dots, as FlashAttention does: one rounding more, whose error scales with |V| and |dS|*|K|
    rather than with the result, so it is allowed two bf16 ulps of the largest exact value on top.
    LONGCTX_TRITON_PRECISE=1 also multiplies the rounding residual and meets the conformance bound
    (twice the reference's error plus a quarter ulp)."""
    monkeypatch.setenv("LONGCTX_TRITON_PRECISE", "1" if precise else "0")
    _, shape, make = case
    mask = make(shape[0], shape[1], shape[2])
    q, k, v, do = _inputs(shape, torch.bfloat16, seed=1)
    exact = _exact(q, k, v, do, mask)
    mine, ref = _run("triton", q, k, v, do, mask), _run("reference", q, k, v, do, mask)
    assert mine[0].dtype == torch.bfloat16 and mine[1].dtype == torch.float32
    _check_lse(mine[1], exact[1])
    ulps = 2**-8 if precise else 2**-6
    for name, a, r, x in zip(("out", "dq", "dk", "dv"), _flat(mine), _flat(ref), _flat(exact)):
        bound = 2 * _err(r, x) + ulps * x.abs().max().item()
        assert _err(a, x) <= bound, (name, _err(a, x), bound)


def test_backward_with_global_out_and_lse_of_a_merge():
    """Ring-style use: two key blocks computed separately, merged, each backward given the GLOBAL out/lse."""
    shape = (1, 13, 21, 4, 2, 32)
    q, k, v, do = _inputs(shape, torch.float32, seed=2)
    mask, sq, sk, cut = Mask.causal(-2), 13, 21, 9
    parts = [(0, cut), (cut, sk)]
    subs = [mask.sub(0, sq, k0, k1, sq, sk) for k0, k1 in parts]
    outs = [K.forward(q, k[:, a:b], v[:, a:b], mask=m, backend="triton") for (a, b), m in zip(parts, subs)]
    out, lse = K.merge(outs[0][0], outs[0][1], outs[1][0], outs[1][1])
    grads = [K.backward(do, q, k[:, a:b], v[:, a:b], out, lse, mask=m, backend="triton")
             for (a, b), m in zip(parts, subs)]
    r_out, r_lse, (rq, rk, rv) = _exact(q, k, v, do, mask)
    assert _err(out, r_out) <= 1e-5
    assert _err(grads[0][0] + grads[1][0], rq) <= 1e-5
    assert _err(torch.cat([grads[0][1], grads[1][1]], 1), rk) <= 1e-5
    assert _err(torch.cat([grads[0][2], grads[1][2]], 1), rv) <= 1e-5


def test_strided_inputs_and_autograd():
    b, s, h, d = 1, 17, 2, 32
    g = torch.Generator().manual_seed(3)
    # (B, H, S, D) storage seen as (B, S, H, D): strided rows; and one tensor whose last dim is strided.
    q = torch.randn(b, h, s, d, generator=g).to(DEV).transpose(1, 2).requires_grad_()
    k = torch.randn(b, h, s, d, generator=g).to(DEV).transpose(1, 2).requires_grad_()
    v = torch.randn(b, s, h, 2 * d, generator=g).to(DEV)[..., ::2].requires_grad_()
    do = torch.randn(b, s, h, d, generator=g).to(DEV)
    out = K.attention(q, k, v, mask=Mask.causal(), backend="triton")
    out.backward(do)
    ref, _, ref_grads = oracle.attention(q.cpu(), k.cpu(), v.cpu(), right=0, do=do.cpu())
    assert _err(out.cpu(), ref) <= 1e-5
    for a, r in zip((q, k, v), ref_grads):
        assert _err(a.grad.cpu(), r) <= 1e-5


# --------------------------------------------------------------------------- band skipping
PLAN_MASKS = [Mask.none(), Mask.causal(), Mask.causal(-5), Mask.causal(7), Mask.shifted_causal(),
              Mask.sliding_window(3), Mask.sliding_window(20, causal=False), Mask(left=2, right=-1),
              Mask(left=-30, right=40), Mask(left=0, right=0)]


def _tiles(mask, sq, sk, bm, bn):
    """Brute force from the dense mask: per q tile, (partial, full) counts of KV tiles in the band."""
    dense = mask.dense(sq, sk)[0]
    res = []
    for m0 in range(0, sq, bm):
        part = full = 0
        for n0 in range(0, sk, bn):
            blk = dense[m0:m0 + bm, n0:n0 + bn]
            if blk.any():
                if n0 + bn <= sk and blk.all():
                    full += 1
                else:
                    part += 1
        res.append((part, full))
    return res


@pytest.mark.parametrize("mask", PLAN_MASKS, ids=[m.kind for m in PLAN_MASKS])
def test_tile_plan_visits_exactly_the_band(mask):
    for sq, sk, bm, bn in ((37, 53, 16, 16), (64, 40, 32, 16), (5, 90, 16, 32), (100, 100, 64, 32)):
        off, left, right = triton_backend.band_args(mask, sq, sk)
        got = []
        for m0 in range(0, sq, bm):
            lo_t, f0, f1, hi = triton_backend.tile_plan(m0, min(m0 + bm, sq) - 1, sk, off, left, right, bn)
            part = len(range(lo_t, f0, bn)) + len(range(f1, hi, bn))
            got.append((part, len(range(f0, f1, bn))))
        assert got == _tiles(mask, sq, sk, bm, bn), (sq, sk, bm, bn)
        # The dK/dV programs walk the same band seen from the keys: (off, left, right) -> (-off, right, left).
        t = Mask(left=right, right=left, offset=-off)
        for n0 in range(0, sk, bn):
            lo_t, f0, f1, hi = triton_backend.tile_plan(n0, min(n0 + bn, sk) - 1, sq, -off, right, left, bm)
            want = _tiles(t, sk, sq, bn, bm)[n0 // bn]
            assert (len(range(lo_t, f0, bm)) + len(range(f1, hi, bm)), len(range(f0, f1, bm))) == want


def test_tile_plan_random_bands():
    g = torch.Generator().manual_seed(5)
    rnd = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=g))  # noqa: E731
    for _ in range(300):
        sq, sk, bm, bn = rnd(1, 70), rnd(1, 70), 2 ** rnd(0, 5), 2 ** rnd(0, 5)
        left, right = rnd(-40, 40), rnd(-40, 40)
        mask = Mask(left=left if right >= -left or rnd(0, 1) else None, right=right, offset=rnd(-60, 60))
        off, lft, rgt = triton_backend.band_args(mask, sq, sk)
        got = []
        for m0 in range(0, sq, bm):
            lo_t, f0, f1, hi = triton_backend.tile_plan(m0, min(m0 + bm, sq) - 1, sk, off, lft, rgt, bn)
            got.append((len(range(lo_t, f0, bn)) + len(range(f1, hi, bn)), len(range(f0, f1, bn))))
        assert got == _tiles(mask, sq, sk, bm, bn), (mask, sq, sk, bm, bn)


@pytest.mark.skipif(CUDA, reason="tile counts use the interpreter's fixed 16x16 tiles")
@pytest.mark.parametrize("mask", [Mask.causal(), Mask.sliding_window(5), Mask.causal(-20)],
                         ids=lambda m: m.kind)
def test_kernel_skips_tiles_outside_the_band(mask):
    sq, sk = 40, 72
    q, k, v, _ = _inputs((1, sq, sk, 1, 1, 16), torch.float32)
    visits = triton_backend.tile_visits(q, k, v, mask=mask)  # (B*H, q tiles, 2)
    bm, bn = triton_backend.fwd_block_sizes(16, torch.float32)
    assert [tuple(x) for x in visits[0].tolist()] == _tiles(mask, sq, sk, bm, bn)
    assert visits.sum() < (-(-sq // bm)) * (-(-sk // bn))  # strictly fewer than all tiles


# --------------------------------------------------------------------------- selection and availability
@pytest.mark.skipif(CUDA, reason="CPU selection rule")
def test_auto_never_picks_triton_on_cpu(monkeypatch):
    q, k, v, _ = _inputs((1, 8, 8, 2, 2, 32), torch.float32)
    if not torch.backends.cuda.is_built():  # CPU-only torch: explicit-only, even with the opt-in set
        assert triton_backend.supports(q, k, v, Mask.causal()) is None
        assert K.resolve("auto", q, k, v, Mask.causal()).name != "triton"
    monkeypatch.delenv("LONGCTX_TRITON_ON_CPU")
    assert K.resolve("auto", q, k, v, Mask.causal()).name != "triton"
    assert triton_backend.supports(q, k, v, Mask.causal()) == triton_backend.CPU_REASON
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        K.forward(q, k, v, mask=Mask.causal(), backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert K.resolve("auto", q, k, v, Mask.causal()).name != "triton"


def test_supports_explains_what_it_rejects():
    q = torch.zeros(1, 4, 2, 32, dtype=torch.float64, device=DEV)
    assert "float64" in triton_backend.supports(q, q, q, Mask.none())
    q = torch.zeros(1, 4, 2, 512, device=DEV)
    assert "head_dim 512" in triton_backend.supports(q, q, q, Mask.none())


def test_importing_kernels_does_not_import_triton():
    code = "import sys, longctx.kernels as K; K.backend_status(); assert 'triton' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k not in _ENV}
    env["CUDA_VISIBLE_DEVICES"] = ""
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_gpu_bf16_seq1024_head_dim_128(monkeypatch):
    monkeypatch.delenv("LONGCTX_TRITON_AUTOTUNE")  # the real path: autotuned tiles
    shape = (1, 1024, 1024, 8, 2, 128)
    mask = Mask.causal()
    q, k, v, do = _inputs(shape, torch.bfloat16, seed=4)
    exact = _exact(q, k, v, do, mask)
    mine, ref = _run("triton", q, k, v, do, mask), _run("reference", q, k, v, do, mask)
    _check_lse(mine[1], exact[1])
    for name, a, r, x in zip(("out", "dq", "dk", "dv"), _flat(mine), _flat(ref), _flat(exact)):
        assert _err(a, x) <= 2 * _err(r, x) + 2**-6 * x.abs().max().item(), name


def test_bench_kernel_reports_skips_and_virtual_ranks(tmp_path):
    from longctx.bench import kernel as bench

    out = tmp_path / "k.json"
    argv = ["--backends", "triton,reference,flash", "--seq-lens", "32", "--head-dim", "16", "--heads", "2",
            "--kv-heads", "1", "--causal", "--dtype", "float32", "--warmup", "0", "--iters", "1",
            "--check-len", "16", "--virtual-ranks", "2", "--schedule", "zigzag", "--device", DEV,
            "--json", str(out)]
    p = bench.argparse.ArgumentParser()
    bench.add_arguments(p)
    recs = {r["backend"]: r for r in bench.run(p.parse_args(argv))}
    why = K.backends()["flash"].availability()
    if why:  # a backend that exists but cannot run here is a row that says why
        assert recs["flash"]["status"] == f"skipped: {why}"
    for name in ("triton", "reference"):
        r = recs[name]
        assert r["status"] == "ok", r["status"]
        assert r["fwdbwd_tflops"] > 0 and r["max_abs_err_out"] <= 1e-5
        assert r["virtual_calls"] >= 4 and r["virtual_ratio"] > 0 and r["virtual_max_abs_err_out"] <= 1e-5
    assert out.exists()


def test_bench_kernel_with_soft_capping(tmp_path):
    # --softcap times the backends that cap (triton, reference) and says why the others are skipped; the
    # accuracy check compares with the capped reference; a bad cap is an error naming the flag
    from longctx.bench import kernel as bench

    argv = ["--backends", "triton,reference,sdpa,torch-math", "--seq-lens", "32", "--head-dim", "16", "--heads", "2",
            "--causal", "--dtype", "float32", "--warmup", "0", "--iters", "1", "--check-len", "16", "--device", DEV,
            "--softcap", "0.5", "--virtual-ranks", "2"]
    p = bench.argparse.ArgumentParser()
    bench.add_arguments(p)
    recs = {r["backend"]: r for r in bench.run(p.parse_args(argv))}
    assert recs["sdpa"]["status"] == "skipped: it does not compute logit soft-capping"
    assert recs["torch-math"]["status"] == "skipped: torch's SDPA has no logit soft-capping"
    for name in ("triton", "reference"):
        r = recs[name]
        assert r["status"] == "ok" and r["softcap"] == 0.5, r["status"]
        assert r["max_abs_err_out"] <= 1e-5 and r["virtual_max_abs_err_out"] <= 1e-5
    with pytest.raises(ValueError, match=r"--softcap must be a positive number .* got -1.0"):
        bench.run(p.parse_args([*argv[:-4], "--softcap", "-1"]))


def test_values_of_another_width_run_in_tiles_of_their_own():
    # the backend's own forward/backward (not the registry, which would zero-pad a backend of one width) with
    # v narrower and wider than q/k: outputs and gradients at v's width, against the float64 oracle
    be = K.backends()["triton"]
    assert be.value_width
    for d, dv in ((32, 16), (16, 24)):
        torch.manual_seed(d)
        q, k = torch.randn(1, 11, 4, d, device=DEV), torch.randn(1, 13, 2, d, device=DEV)
        v, do = torch.randn(1, 13, 2, dv, device=DEV), torch.randn(1, 11, 4, dv, device=DEV)
        mask = Mask.causal()
        out, lse = be.forward(q, k, v, scale=d ** -0.5, mask=mask)
        grads = be.backward(do, q, k, v, out, lse, scale=d ** -0.5, mask=mask)
        assert out.shape == (1, 11, 4, dv) and grads[2].shape == v.shape and grads[0].shape == q.shape
        x_out, _, x_grads = oracle.attention(q.cpu(), k.cpu(), v.cpu(), do=do.cpu(), **oracle.band(mask))
        for got, want in zip((out, *grads), (x_out, *x_grads)):
            assert (got.cpu().double() - want).abs().max() <= 1e-5, (d, dv)


"""`longctx bench kernel` with torch's own SDPA backends as baselines: they run where torch can, are
checked against the reference like any backend, and say why they are skipped elsewhere."""

import argparse

import pytest
import torch

from longctx.bench import kernel as bench


def _run(*extra):
    p = argparse.ArgumentParser()
    bench.add_arguments(p)
    argv = ["--seq-lens", "32", "--head-dim", "16", "--heads", "4", "--kv-heads", "2", "--dtype", "float32",
            "--warmup", "0", "--iters", "1", "--check-len", "32", "--device", "cpu", *extra]
    return {r["backend"]: r for r in bench.run(p.parse_args(argv))}


def test_torch_baselines_run_and_are_checked():
    recs = _run("--backends", "torch-flash,torch-math,torch-efficient,torch-cudnn", "--causal")
    for name in ("torch-flash", "torch-math"):
        r = recs[name]
        assert r["status"] == "ok", r["status"]
        assert r["fwdbwd_tflops"] > 0 and r["max_abs_err_out"] <= 1e-5
    if not torch.cuda.is_available():
        assert recs["torch-efficient"]["status"] == "skipped: torch-efficient runs on CUDA only"
        assert recs["torch-cudnn"]["status"] == "skipped: torch-cudnn runs on CUDA only"


def test_torch_baselines_refuse_masks_they_cannot_express():
    recs = _run("--backends", "torch-flash,reference", "--window", "8")
    assert recs["torch-flash"]["status"].startswith("skipped: torch-flash takes full or causal masks only")
    assert recs["reference"]["status"] == "ok"
    # alone it would measure nothing: an error with the reason
    with pytest.raises(ValueError, match=r"--backends 'torch-flash': none can run here \(torch-flash: torch-flash "
                                         r"takes full or causal masks only"):
        _run("--backends", "torch-flash", "--window", "8")


def test_values_of_another_width_run_through_the_padding_and_count_both_widths():
    """--v-head-dim (latent attention): sdpa computes one width, so the registry pads it, as in training; the
    output is checked against the reference and the FLOPs count q.k over 16 and p.v over 8 features."""
    recs = _run("--backends", "sdpa,reference", "--v-head-dim", "8", "--causal", "--virtual-ranks", "2")
    for r in recs.values():
        assert r["status"] == "ok" and r["v_head_dim"] == 8, r["status"]
        assert r["max_abs_err_out"] <= 1e-5 and r["virtual_max_abs_err_out"] <= 1e-5
        pairs = 32 * 33 // 2
        assert r["fwd_tflops"] == pytest.approx(2 * 4 * (16 + 8) * pairs / (r["fwd_ms"] * 1e-3) / 1e12)


def test_a_backend_that_fell_back_says_so_in_its_status(monkeypatch):
    """sdpa's calls that went to reference are named in its status (a window over a dense-mask limit made
    tiny here); the reference's own rows never are, nor does one backend's fallback leak into another's."""
    from longctx.kernels import sdpa

    monkeypatch.setattr(sdpa, "DENSE_MASK_LIMIT", 16)
    recs = _run("--backends", "sdpa,reference", "--window", "8")
    assert recs["sdpa"]["status"].startswith("ok (fell back to reference: {'cpu-mask-size': "), recs["sdpa"]
    assert recs["reference"]["status"] == "ok"


def test_a_torch_baseline_that_cannot_take_the_call_is_skipped_with_torchs_reason():
    """torch gives its reason only in warnings before "No available kernel": the row says skipped, with it."""
    recs = _run("--backends", "torch-flash,reference", "--v-head-dim", "8")
    status = recs["torch-flash"]["status"]
    assert status.startswith("skipped: torch cannot run torch-flash here: ") and "last dimension" in status, status
    assert recs["reference"]["status"] == "ok"

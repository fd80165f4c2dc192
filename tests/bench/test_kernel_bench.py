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

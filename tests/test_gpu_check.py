"""`make gpu-check` without a GPU: runs cleanly, says what it skipped and why, and what it would run is
valid (the config loads for one GPU, every bench command parses, every test path exists)."""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from longctx.bench import kernel as bench_kernel
from longctx.config import load
from longctx.train.setup import validate_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_check.py")


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="this is the no-GPU behaviour")
def test_without_a_gpu_it_skips_with_reasons_and_exits_0(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    p = subprocess.run([sys.executable, SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((tmp_path / "gpu_check_summary.json").read_text())
    steps = summary["steps"]
    assert list(steps) == ["info", "kernel-causal", "kernel-full", "virtual-ranks", "train-1b-32k", "tests",
                           "softcap", "latent-widths"]
    assert steps["info"]["status"] == "ok" and "kernel backends" in steps["info"]["tail"].lower()
    for name in list(steps)[1:]:
        assert steps[name]["status"] == "skipped: no CUDA GPU visible to torch", (name, steps[name])
    assert "skipped: no CUDA GPU" in p.stdout and (tmp_path / "gpu_check.log").exists()


def test_what_it_would_run_is_valid(tmp_path, triton_env):
    triton_env()  # the softcap step names triton alone: on this machine it is valid under the interpreter
    steps = _module()._steps(str(tmp_path), str(tmp_path / "run"))
    assert len({s[0] for s in steps}) == len(steps)
    for name, cmd, _, timeout in steps:
        assert timeout <= 180, name
        if cmd[:2] == ["-m", "pytest"]:
            for path in (c for c in cmd if c.startswith("tests/")):
                assert os.path.exists(os.path.join(ROOT, path)), path
        elif cmd[2:4] == ["bench", "kernel"]:
            p = argparse.ArgumentParser()
            bench_kernel.add_arguments(p)
            bench_kernel.validate(p.parse_args(cmd[4:]))
        elif cmd[2] == "train":
            cfg = load(path=os.path.join(ROOT, cmd[3]), overrides=cmd[4:])
            validate_job(cfg, 1)
            assert cfg.train.seq_len == 32768 and cfg.parallel.kernel == "auto"
    # the files it writes fit what the device tool brings back: at most 8
    outs = {c.split("/")[-1] for _, cmd, _, _ in steps for c in cmd if c.startswith(str(tmp_path) + "/")}
    assert len(outs | {"gpu_check.log", "gpu_check_summary.json", "train_metrics.jsonl"}) <= 8, outs

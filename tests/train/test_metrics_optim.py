"""FLOP counting against brute force and the built model; the LR schedule; AdamW parameter groups."""

import math
import os

import pytest
import torch
from torch import nn

from longctx.config import load
from longctx.launch import run
from longctx.model import build_model
from longctx.train import attention_pairs, build_optimizer, build_scheduler, lr_factor, model_flops_per_step


def _brute_pairs(n, window=None):
    return sum(1 for i in range(n) for j in range(i + 1) if window is None or i - j < window)


def _brute_dilated(n, ws, rs):
    """Causal pairs of head 0 (row/key offset 0) inside every sparsified segment of every pattern."""
    total = 0
    for w, r in zip(ws, rs):
        w = min(w, n)
        for i in range(n):
            for j in range(i + 1):
                if i // w == j // w and (i % w) % r == 0 and (j % w) % r == 0:
                    total += 1
    return total


def test_attention_pairs_match_brute_force():
    cfg = load(overrides=["model.n_layers=3"]).model
    assert attention_pairs(cfg, 40) == 3 * _brute_pairs(40)
    cfg = load(overrides=["model.n_layers=2", "model.window=7"]).model
    assert attention_pairs(cfg, 40) == 2 * _brute_pairs(40, 7)
    cfg = load(overrides=["model.n_layers=2", "model.dilated.layers=[1]", "model.dilated.segment_lengths=[8,16,32]",
                          "model.dilated.dilation_rates=[1,2,4]"]).model
    assert attention_pairs(cfg, 32) == _brute_pairs(32) + _brute_dilated(32, [8, 16, 32], [1, 2, 4])


@pytest.mark.parametrize("head_dim", [None, 48])
def test_dense_flops_are_six_per_matmul_parameter_per_token(head_dim):
    # head_dim 48 != dim / n_heads = 32 (as Qwen3 and Gemma decouple them): q/k/v/o and attention widen
    cfg = load(overrides=["model.n_kv_heads=1", f"model.head_dim={head_dim or 'null'}"]).model
    model = build_model(cfg)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    assert model.layers[0].attention.wq.weight.shape == (cfg.n_heads * (head_dim or 32), cfg.dim)
    f = model_flops_per_step(cfg, 64, 3)
    assert f["dense"] == 6 * matmul * 64 * 3
    width = model.layers[0].attention.wo.weight.shape[1]  # n_heads x head_dim, read from the built model
    assert f["attention"] == 12 * width * cfg.n_layers * _brute_pairs(64) * 3
    assert f["total"] == f["dense"] + f["attention"]


@pytest.mark.parametrize("window", [None, 5])
def test_packed_attention_pairs_stay_inside_documents(window):
    from longctx.parallel import Documents
    from longctx.train.metrics import document_attention_pairs

    cfg = load(overrides=["model.n_layers=3", *([f"model.window={window}"] if window else [])]).model
    lengths = [[1, 7, 20, 4], [32]]
    docs = Documents.from_lengths(lengths)
    want = sum(_brute_pairs(n, window) for row in lengths for n in row)
    assert document_attention_pairs(cfg, docs) == 3 * want
    f = model_flops_per_step(cfg, 32, 2, pairs=document_attention_pairs(cfg, docs))
    head_dim = cfg.dim // cfg.n_heads
    assert f["attention"] == 12 * cfg.n_heads * head_dim * 3 * want
    assert f["dense"] == model_flops_per_step(cfg, 32, 2)["dense"]


def test_lr_schedule_warmup_then_cosine():
    f = [lr_factor(s, warmup=3, total=10, min_ratio=0.1) for s in range(10)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert f[3] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))  # non-increasing after warmup
    mid = lr_factor(3 + 3, warmup=3, total=10, min_ratio=0.1)  # halfway through the 6 decay steps
    assert mid == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(0, warmup=0, total=5, min_ratio=0.0) == pytest.approx(1.0)
    # one step after warmup is the last: at the floor, as every schedule's last step is
    assert [lr_factor(s, warmup=3, total=4, min_ratio=0.1) for s in range(4)] == pytest.approx([1 / 3, 2 / 3, 1, 0.1])
    assert lr_factor(0, warmup=0, total=1, min_ratio=0.1) == pytest.approx(1.0)  # a one-step run: its peak


def test_lr_schedules_linear_constant_and_a_stable_phase():
    """Hand-computed: warmup 2 of 10 steps, floor 0.1; a 4-step decay leaves steps 2-5 at the peak (WSD)."""
    def factors(schedule, decay, total=10, warmup=2):
        return [lr_factor(s, warmup=warmup, total=total, min_ratio=0.1, schedule=schedule, decay=decay)
                for s in range(total)]

    assert factors("linear", 4) == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.775, 0.55, 0.325, 0.1])
    cos45 = 0.5 * (1 + 2 ** -0.5)  # the cosine's shape a quarter and three quarters through
    assert factors("cosine", 4) == pytest.approx([0.5, 1, 1, 1, 1, 1, 0.1 + 0.9 * cos45, 0.55,
                                                  0.1 + 0.9 * (1 - cos45), 0.1])
    assert factors("constant", 0) == pytest.approx([0.5] + [1.0] * 9)
    # decay 0: every step after the first at the peak; the longest decay starts right after the warmup
    assert factors("linear", 0, total=5, warmup=1) == pytest.approx([1, 1, 0.7, 0.4, 0.1])
    assert factors("linear", 4, total=6) == pytest.approx([0.5, 1, 0.775, 0.55, 0.325, 0.1])
    assert factors("cosine", 0) == pytest.approx([lr_factor(s, warmup=2, total=10, min_ratio=0.1) for s in range(10)])


def test_optimizer_and_scheduler_from_config():
    cfg = load(overrides=["train.lr=0.01", "train.warmup_steps=2", "train.steps=4", "train.weight_decay=0.2"])
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg.train, "cpu")
    sched = build_scheduler(opt, cfg.train)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    lrs = []
    for _ in range(4):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.005, 0.01, 0.01, 0.001])
    assert isinstance(opt, torch.optim.AdamW)
    wsd = load(overrides=["train.lr=0.01", "train.warmup_steps=1", "train.steps=6", "train.lr_schedule=linear",
                          "train.decay_steps=3"]).train
    sched = build_scheduler(build_optimizer(model, wsd, "cpu"), wsd)
    lrs = []
    for _ in range(6):
        lrs.append(sched.get_last_lr()[0])
        sched.optimizer.step()
        sched.step()
    assert lrs == pytest.approx([0.01, 0.01, 0.01, 0.007, 0.004, 0.001])  # warmup, stable, a linear decay of 3


def test_adamw_steps_dtensor_parameters_through_their_local_pieces_exactly():
    """longctx's AdamW updates each rank's piece of a sharded or replicated parameter (a partial-sum gradient
    summed first, a replicated one sliced to the parameter's shard): bit for bit torch's AdamW on the full
    tensors, over steps whose bias corrections differ."""
    from tests.train._optim_workers import local_adamw_steps

    torch.manual_seed(0)
    shapes = [(4, 6), (6,), (8, 3), (5,)]
    full = [torch.randn(s) for s in shapes]
    grads = [torch.randn(s) for s in shapes]
    expected = [nn.Parameter(p.clone()) for p in full]
    opt = torch.optim.AdamW([{"params": expected[:1] + expected[2:], "weight_decay": 0.1},
                             {"params": expected[1:2], "weight_decay": 0.0}], lr=0.01, foreach=True)
    for step in range(3):
        for p, g in zip(expected, grads):
            p.grad = g * (step + 1)
        opt.step()
    for got in run(local_adamw_steps, 2, args=(full, grads, 3)):
        assert got["moments_kept"] and got["strategies_derived"] == []
        for name, a, b, before in zip(["sharded", "partial-sum grad", "replicated grad", "plain"], got["params"],
                                      expected, full):
            if name == "partial-sum grad":  # its two addends sum to the full gradient up to one rounding
                torch.testing.assert_close(a, b.detach(), rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(a, b.detach()), name
            assert not torch.equal(a, before), name  # every one moved


def test_a_resumed_run_moves_the_lost_attempts_records_aside(tmp_path, capsys):
    import json

    from longctx.train.metrics import SUPERSEDED, MetricsLogger

    path, aside = tmp_path / "metrics.jsonl", tmp_path / SUPERSEDED

    def steps(file):
        return [json.loads(ln)["step"] for ln in file.read_text().splitlines()]

    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 6)]
    path.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # the last line cut short by a killed writer
    logger = MetricsLogger(str(tmp_path), enabled=True, total_steps=2, quiet=True, tensorboard=False,
                           resumed_step=3)
    logger.log({"step": 4, "loss": 0.5, "lr": 0.0, "tokens_per_s": 1.0, "flops_per_s": 1.0})
    logger.close()
    assert steps(path) == [1, 2, 3, 4] and steps(aside) == [4, 5]  # every step once; the lost attempt's kept aside
    assert "moved 2 record(s) of steps after 3" in capsys.readouterr().err
    # no step to drop: a cut-short last line still goes
    with open(path, "a") as f:
        f.write('{"step": 5, "lo')
    MetricsLogger(str(tmp_path), enabled=True, total_steps=1, quiet=True, tensorboard=False, resumed_step=4).close()
    assert steps(path) == [1, 2, 3, 4] and "dropped 1 line(s) cut short" in capsys.readouterr().err
    # a run starting at step 0 (a fresh one, or a restart before any checkpoint was complete) in a run_dir with
    # records: they are an earlier run's and move aside, never mixed with this run's nor lost
    MetricsLogger(str(tmp_path), enabled=True, total_steps=1, quiet=True, tensorboard=False, resumed_step=0).close()
    assert path.read_text() == "" and steps(aside) == [4, 5, 1, 2, 3, 4]


def test_runs_started_in_one_second_get_run_directories_of_their_own(tmp_path, monkeypatch):
    import time

    from longctx.train.setup import default_run_dir

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt: "20261130-163803")
    names = [default_run_dir("configs/tiny.yaml") for _ in range(3)] + [default_run_dir(None)]
    assert names == ["runs/tiny-20261130-163803", "runs/tiny-20261130-163803-2", "runs/tiny-20261130-163803-3",
                     "runs/run-20261130-163803"]
    assert all(os.path.isdir(n) for n in names)  # taken when named: the next run cannot name it too


def test_fp32_mfu_is_against_the_peak_its_matmuls_run_at(monkeypatch):
    """IEEE fp32 unless the process allowed TF32 (torch's default is not to): MFU against the TF32 tensor-core
    peak would read ~7x low on an H100."""
    from longctx.train import metrics

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert metrics.peak_flops(cuda, "fp32") == 67e12 and metrics.peak_flops(cuda, "bf16") == 989e12
        torch.set_float32_matmul_precision("high")  # what allow_tf32 = True sets
        assert metrics.peak_flops(cuda, "fp32") == 494.5e12
    finally:
        torch.set_float32_matmul_precision(before)
    assert metrics.peak_flops(torch.device("cpu"), "fp32") is None


def test_fp32_peak_under_torchs_per_backend_precision_api():
    """torch.backends.cuda.matmul.fp32_precision (torch's newer API) makes the legacy query raise: the peak is read
    from the new one. In a child process: the setting cannot be undone to the legacy API's state."""
    import subprocess
    import sys

    code = ("import torch\nfrom longctx.train import metrics\n"
            "torch.cuda.get_device_name = lambda device=None: 'NVIDIA H100 80GB HBM3'\n"
            "cuda = torch.device('cuda', 0)\n"
            "for setting in ('ieee', 'tf32'):\n"
            "    torch.backends.cuda.matmul.fp32_precision = setting\n"
            "    print(setting, metrics.peak_flops(cuda, 'fp32'), metrics.peak_flops(cuda, 'bf16'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split("\n")[:2] == ["ieee 67000000000000.0 989000000000000.0",
                                          "tf32 494500000000000.0 989000000000000.0"], out.stdout

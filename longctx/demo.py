"""`make demo` / `longctx demo`: a real run on a simulated 4-rank CPU cluster (gloo processes).

1. exact attention: every sequence-parallel strategy against a float64 single-device reference, with the
   bytes each rank sent (counted vs the closed-form model) and the counted work imbalance;
2. exact training: a few AdamW steps of a small model in one process, and the same config on 4 ranks in
   several layouts: the losses and final parameters agree;
3. training: the tiny model, zigzag context parallelism over 4 ranks, 16,384-token sequences; the loss
   falls while rank 0 shows the progress bar.
"""

from __future__ import annotations

import argparse
import os
import time

DEMO_SEQ_LEN = 16384
EXACT = ["model.dim=32", "model.ffn_dim=64", "train.steps=3", "train.seq_len=128", "train.batch_size=4",
         "train.grad_clip=0.5", "data.task=copy", "logging.quiet=true", "logging.tensorboard=false"]
EXACT_LAYOUTS = [
    ("cp=4 zigzag", ["parallel.cp=4", "parallel.strategy=zigzag"]),
    ("cp=4 ring", ["parallel.cp=4", "parallel.strategy=ring"]),
    ("cp=4 hybrid (ring 2 x ulysses 2)", ["parallel.cp=4", "parallel.strategy=hybrid", "parallel.ulysses=2"]),
    ("dp_shard=2 x cp=2 (FSDP2)", ["parallel.dp_shard=2", "parallel.cp=2"]),
    ("dp_replicate=2 x dp_shard=2 (HSDP)", ["parallel.dp_replicate=2", "parallel.dp_shard=2", "parallel.cp=1"]),
]


def _config_path() -> str:
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(here, "configs", "tiny.yaml")
    return path if os.path.exists(path) else None


def _job(overrides, run_dir) -> dict:
    from omegaconf import OmegaConf

    from .config import load

    return OmegaConf.to_container(load(path=_config_path(), overrides=[*overrides, f"run_dir={run_dir}"]))


def _train_configs(configs: list[dict]) -> list[tuple]:
    """On every rank: train each config; returns (losses, full final parameters) per config."""
    from .config import from_dict
    from .train import Trainer

    out = []
    for c in configs:
        trainer = Trainer(from_dict(c))
        trainer.fit()
        out.append(([r["loss"] for r in trainer.history], trainer.full_state_dict()))
    return out


def _attention() -> None:
    from .bench import attention as bench_attention

    p = argparse.ArgumentParser()
    bench_attention.add_arguments(p)
    args = p.parse_args(["--world-size", "4", "--seq-len", "1024", "--heads", "8", "--kv-heads", "2",
                         "--head-dim", "32", "--causal", "--iters", "1", "--warmup", "0",
                         "--json", "out/demo_attention.json"])
    bench_attention.run(args)
    print("  (errors vs a float64 single-device reference; bytes counted by the comm layer vs the closed-form\n"
          "   model; imbalance_counted = critical-path pairs the ranks recorded as they ran / an even split;\n"
          "   times are per rank on a 2-core CPU)")


def _exact_training(tmp: str) -> None:
    from .bench.report import table
    from .launch import run

    (ref_losses, ref_params), = run(_train_configs, 1, args=([_job(EXACT, f"{tmp}/one")],), timeout=300)[0]
    configs = [_job([*EXACT, *o], f"{tmp}/l{i}") for i, (_, o) in enumerate(EXACT_LAYOUTS)]
    results = run(_train_configs, 4, args=(configs,), timeout=600)[0]
    rows = [{"layout": "1 process (reference)", "loss per step": " ".join(f"{x:.6f}" for x in ref_losses)}]
    for (name, _), (losses, params) in zip(EXACT_LAYOUTS, results):
        rows.append({"layout": name, "loss per step": " ".join(f"{x:.6f}" for x in losses),
                     "max rel loss diff": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
                     "max |param diff|": max((params[k] - ref_params[k]).abs().max().item() for k in params)})
    print(table(rows, ["layout", "loss per step", "max rel loss diff", "max |param diff|"]))
    print("  (fp32, AdamW with warmup, cosine and clipping at 0.5; the copy task ignores the prompt's labels, so\n"
          "   under ring two of the four ranks hold no real label: the loss is normalised by the global count)")


RUN_DIR = "out/demo_run"
RESUME_STEPS = 3


def _train(steps: int, *, resume: bool) -> dict:
    """One job of steps + RESUME_STEPS steps, stopped after `steps` (part 3, a checkpoint then), and resumed from
    that checkpoint by a new job (part 4), as after a failure."""
    from .launch import run, train_main

    cfg = _job([f"train.seq_len={DEMO_SEQ_LEN}", "train.batch_size=1", f"train.steps={steps + RESUME_STEPS}",
                "train.lr=1e-2", "train.warmup_steps=2", "parallel.cp=4", "parallel.strategy=zigzag",
                "logging.print_config=false", f"checkpoint.interval={steps}",
                f"train.resume={'auto' if resume else 'none'}"], RUN_DIR)
    return run(train_main, 4, args=(cfg,), kwargs={"steps": None if resume else steps}, timeout=1800,
               record_stops=True)[0]


def _loss_plot(run_dir: str, resumed_at: int) -> str:
    import json

    from .bench.report import plot_lines

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    first = [(r["step"], r["loss"]) for r in rows if r["step"] <= resumed_at]
    after = [(r["step"], r["loss"]) for r in rows if r["step"] >= resumed_at]
    path = os.path.join(run_dir, "loss.png")
    plot_lines(path, {"trained": ([x for x, _ in first], [y for _, y in first]),
                      "resumed from the checkpoint": ([x for x, _ in after], [y for _, y in after])},
               xlabel="step", ylabel="loss", title=f"longctx demo: zigzag cp=4, {DEMO_SEQ_LEN:,}-token sequences")
    return path


def check_outputs() -> None:
    """The demo writes under ./out (its attention records, its run directory, replaced each time): a file in the
    way is found before part 1 runs, not after it."""
    from ._paths import check_output

    what = "the demo (it writes under ./out of the directory it runs in) output"
    check_output("out/demo_attention.json", what)
    check_output(RUN_DIR, what, "dir")


def main(argv=None) -> int:
    import shutil
    import tempfile

    p = argparse.ArgumentParser(prog="longctx demo")
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args(argv)
    t0 = time.time()
    shutil.rmtree(RUN_DIR, ignore_errors=True)  # the demo's own run directory: every demo starts fresh
    with tempfile.TemporaryDirectory() as tmp:
        print("== 1. exact attention: every strategy on 4 simulated ranks (seq 1024, 8 query / 2 kv heads) ==")
        _attention()
        print("\n== 2. exact training: 3 steps in one process, and the same config on 4 ranks in five layouts ==")
        _exact_training(tmp)
    print(f"\n== 3. training: tiny model, zigzag context parallel over 4 ranks, {DEMO_SEQ_LEN:,}-token "
          f"sequences, a checkpoint at the end ==")
    s = _train(args.steps, resume=False)
    print(f"  loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} over {s['steps']} steps "
          f"(ln 256 = 5.545: a uniform guess; ln 16 = 2.773: the alphabet alone; lower: the repeats are found)\n"
          f"  {s['tokens_per_s']:.0f} tokens/s on 4 ranks sharing 2 CPU cores, {s['flops_per_s']:.2e} FLOP/s achieved, "
          f"peak RSS {s['peak_mem_bytes'] / 2**20:.0f} MiB per rank\n  checkpoint: {s['checkpoint']}")
    print(f"\n== 4. resume: a new job finds that checkpoint (train.resume=auto) and trains the last {RESUME_STEPS} "
          "steps ==")
    r = _train(args.steps, resume=True)
    print(f"  resumed from {r['resumed_from']}: steps {args.steps + 1}-{r['steps']}, loss {r['first_loss']:.3f} -> "
          f"{r['final_loss']:.3f}; checkpoint: {r['checkpoint']}")
    plot = _loss_plot(RUN_DIR, args.steps)
    print(f"\ndemo finished in {time.time() - t0:.1f}s\n  run directory: {os.path.abspath(RUN_DIR)}\n"
          f"  metrics: {RUN_DIR}/metrics.jsonl (steps 1-{r['steps']}, appended by the resumed job)\n"
          f"  loss plot: {plot}\n  attention records: out/demo_attention.json")
    return 0

"""`longctx launch ray`: the same `longctx train` on a Ray cluster, through Ray Train's TorchTrainer.

Ray Train starts one worker per rank with torch.distributed already initialised (gloo on CPU workers, NCCL
with GPUs), and each worker runs `train_main`, which finds that process group: so the job, its checkpoints
and its metrics are the same as under torchrun or the simulated cluster. `--max-failures` is Ray's
FailureConfig: a failed worker group is restarted, and with `train.resume=auto` it continues from the
newest complete checkpoint. `--address local` starts a Ray instance inside this process (CPU workers on this
machine); `auto` or `ray://HOST:10001` joins a running cluster, whose token authentication stays on.
"""

from __future__ import annotations

from .._optional import require


def _worker(loop_config: dict) -> None:
    """Runs in every Ray Train worker: the one training entry, then the summary as the run's result (every
    worker reports: Ray Train's report is collective; the summary is the same on every rank)."""
    import ray.train

    from .entry import train_main

    summary = train_main(loop_config["config"], loop_config["config_path"])
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None})


def launch_ray(config: dict, config_path: str | None, *, address: str, num_workers: int, gpus_per_worker: float,
               max_failures: int, storage_path: str) -> dict:
    """Run the job on `num_workers` Ray Train workers; returns rank 0's summary (scalars)."""
    ray = require("ray", "longctx launch ray")
    require("ray.train", "longctx launch ray")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=None if address == "local" else address, num_cpus=num_workers if address == "local"
                 else None, include_dashboard=False, log_to_driver=True)
    gpus = gpus_per_worker > 0
    trainer = TorchTrainer(
        _worker, train_loop_config={"config": config, "config_path": config_path},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus,
                                     resources_per_worker={"CPU": 1, **({"GPU": gpus_per_worker} if gpus else {})}),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo", timeout_s=int(config["parallel"]["timeout_s"])),
        run_config=RunConfig(storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)),
    )
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    return _summary(config["run_dir"])


def _summary(run_dir: str) -> dict:
    """What `longctx train` prints, read back from the run's metrics.jsonl (Ray's own result only keeps
    what its storage layer chose to persist)."""
    import json
    import os

    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    timed = rows[1:] or rows
    return {"steps": rows[-1]["step"], "first_loss": rows[0]["loss"], "final_loss": rows[-1]["loss"],
            "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed),
            "seconds": sum(r["step_time_s"] for r in rows), "run_dir": run_dir}

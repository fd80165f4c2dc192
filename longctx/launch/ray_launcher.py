"""`longctx launch ray`: the same `longctx train` on a Ray cluster, through Ray Train's TorchTrainer.

Ray Train starts one worker per rank with torch.distributed already initialised (gloo on CPU workers, NCCL
with GPUs), and each worker runs `train_main`, which finds that process group: so the job, its checkpoints
and its metrics are the same as under torchrun or the simulated cluster. `--max-failures` is Ray's
FailureConfig: a failed worker group is restarted, and with `train.resume=auto` it continues from the
newest complete checkpoint. `--address local` starts a Ray instance inside this process (CPU workers on this
machine); `auto` or `ray://HOST:10001` joins a running cluster (started with RAY_AUTH_MODE=token and a
token, which the job's driver inherits from its node).

Stopping: `ray job stop` (or a scheduler) sends SIGTERM to this driver only; the workers are Ray actors,
out of reach of signals, and would die with the driver, losing the steps since the last checkpoint. So the
driver turns SIGTERM / SIGUSR1 into a flag on a small named actor, every worker polls it once a second
and passes it to its training loop (longctx.train.stop.request_stop: Ray Train runs the loop off the
main thread, where no signal handler can be), and the loop stops as on a signal: after the step in
flight, with a checkpoint; the driver waits for that and exits 128 + the signal. `ray job stop` gives
the driver RAY_JOB_STOP_WAIT_TIME_S (3 s by default) before SIGKILL: raise it at submission
(`--runtime-env-json '{"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}'`). A second signal stops
waiting.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import threading
import uuid

from .._optional import require
from .._signals import ForwardingScope
from ..config import ConfigError

POLL_S = 1.0  # how often a worker asks whether the driver was told to stop
CPUS_PER_WORKER = 1  # what every Ray Train worker reserves (besides its GPUs)


class _StopFlag:
    """The driver's stop request, readable by every worker, and rank 0's summary back to the driver (a named
    Ray actor, no CPU of its own): Ray's result keeps no report without a checkpoint, and the metrics file
    holds every earlier run in the same run_dir too."""

    def __init__(self):
        self.signum = 0
        self.summary = None

    def set(self, signum: int) -> None:
        self.signum = self.signum or signum

    def get(self) -> int:
        return self.signum

    def put_summary(self, summary: dict) -> None:
        self.summary = summary

    def get_summary(self) -> dict | None:
        return self.summary


# keys naming files or directories: Ray Train runs each worker in a directory of its own session, so a
# relative one would be read (or written: checkpoints lost with the session) there, not where it was typed
_PATH_KEYS = (("run_dir",), ("checkpoint", "dir"), ("data", "path"), ("validation", "path"), ("model", "hf_path"),
              ("train", "init_from"), ("train", "resume"), ("parallel", "deepspeed_config"))


def _relative_paths(config: dict) -> list[str]:
    found = []
    for keys in _PATH_KEYS:
        value = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str) and value not in ("auto", "none", "") and not os.path.isabs(value):
            found.append(f"{'.'.join(keys)}={value}")
    return found


def _enter_driver_directory(loop_config: dict) -> None:
    """Run where the driver was started, as every other launcher's ranks do; a node without that directory
    can only take absolute paths (on storage every node sees)."""
    import socket

    cwd = loop_config["cwd"]
    if os.path.isdir(cwd):
        os.chdir(cwd)
        return
    relative = _relative_paths(loop_config["config"])
    if relative:
        raise ConfigError(f"{', '.join(relative)}: relative to the driver's directory {cwd}, which this worker's "
                          f"node ({socket.gethostname()}) does not have; give absolute paths on storage every node "
                          "sees")


def _watch_stop_flag(ray, name: str, done: threading.Event) -> None:
    """A worker's daemon thread: once the flag is up, ask the training loop to stop, again every poll
    (a request made before the loop opened its scope is not kept)."""
    from ..train.stop import request_stop

    flag = ray.get_actor(name)
    while not done.wait(POLL_S):
        try:
            signum = ray.get(flag.get.remote())
        except ray.exceptions.RayError:  # the flag is gone with its driver, and this job with it
            return
        if signum:
            request_stop(signum)


def _worker(loop_config: dict) -> None:
    """Runs in every Ray Train worker: the one training entry, then the summary as the run's result (every
    worker reports: Ray Train's report is collective; the summary is the same on every rank)."""
    import ray
    import ray.train

    from .entry import train_main

    if not faulthandler.is_enabled():  # a worker that dies on a signal leaves its Python stack in its log
        faulthandler.enable(all_threads=True)
    _enter_driver_directory(loop_config)
    done = threading.Event()
    threading.Thread(target=_watch_stop_flag, args=(ray, loop_config["stop_flag"], done), daemon=True).start()
    try:
        summary = train_main(loop_config["config"], loop_config["config_path"])
    finally:
        done.set()
    if ray.train.get_context().get_world_rank() == 0:
        ray.get(ray.get_actor(loop_config["stop_flag"]).put_summary.remote(summary))
    ray.train.report({k: v for k, v in summary.items() if isinstance(v, (int, float, str)) or v is None})


class _ForwardToWorkers(ForwardingScope):
    """In the driver: a stop signal raises the workers' flag; a second one stops waiting (SystemExit)."""

    def __init__(self, flag):
        super().__init__()
        self.flag = flag

    def forward(self, signum: int) -> None:
        self.flag.set.remote(signum)


def launch_ray(config: dict, config_path: str | None, *, address: str, num_workers: int, gpus_per_worker: float,
               max_failures: int, storage_path: str) -> dict:
    """Run the job on `num_workers` Ray Train workers; returns rank 0's summary (scalars)."""
    ray = require("ray", "longctx launch ray")
    require("ray.train", "longctx launch ray")
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started = not ray.is_initialized()
    if started:
        _connect(ray, address, num_workers)
    try:  # checked before anything is scheduled: Ray would wait for missing resources forever, silently
        _check_resources(ray.cluster_resources(), _node_resources(ray), address=address, num_workers=num_workers,
                         gpus_per_worker=gpus_per_worker, cpus_per_worker=CPUS_PER_WORKER)
    except ConfigError:
        if started:  # a Ray started here (--address local) leaves no processes behind
            ray.shutdown()
        raise
    gpus = gpus_per_worker > 0
    flag_name = f"longctx-stop-{uuid.uuid4().hex}"
    flag = ray.remote(_StopFlag).options(name=flag_name, num_cpus=0).remote()
    trainer = TorchTrainer(
        _worker, train_loop_config={"config": config, "config_path": config_path, "stop_flag": flag_name,
                                    "cwd": os.getcwd()},
        scaling_config=ScalingConfig(num_workers=num_workers, use_gpu=gpus, resources_per_worker={
            "CPU": CPUS_PER_WORKER, **({"GPU": gpus_per_worker} if gpus else {})}),
        torch_config=TorchConfig(backend="nccl" if gpus else "gloo", timeout_s=int(config["parallel"]["timeout_s"])),
        run_config=RunConfig(storage_path=storage_path, failure_config=FailureConfig(max_failures=max_failures)),
    )
    # checkpoint.on_signal=false: a stop signal ends the driver, and its workers with it, as it ends any rank
    forwarding = _ForwardToWorkers(flag) if config["checkpoint"]["on_signal"] else contextlib.nullcontext()
    try:
        with forwarding:
            result = trainer.fit()
        summary = ray.get(flag.get_summary.remote())  # the workers' own, before the flag goes
    except ray.train.TrainingFailedError as e:  # Ray Train v2 raises a worker's failure from fit() itself
        if not getattr(e, "worker_failures", None):
            raise  # v1's, or the controller's: its cause chain holds the worker's error
        raise _rank_error(e) from None
    finally:
        with contextlib.suppress(Exception):  # gone with a Ray that is shutting down
            ray.kill(flag)
    if result.error is not None:  # Ray Train v1 may return it
        raise result.error
    if summary is None:
        raise RuntimeError("the Ray Train run ended without rank 0's summary")
    return summary


def _rank_error(error: Exception) -> Exception:
    """A failed Ray Train v2 run (`worker_failures`: rank -> exception) as the simulated cluster reports one
    (rank_errors.RankError), chosen alike: the lowest rank whose error is not an echo of another's (a peer's
    closed connection), so a user's error (a ConfigError inside a worker) is one line on the command line and a
    bug keeps that worker's traceback. Anything else (the controller failed) is returned as it is."""
    import traceback

    from .rank_errors import rank_error

    failures = getattr(error, "worker_failures", None)
    if not failures:
        return error
    found = []
    for rank in sorted(failures):
        cause = failures[rank]
        cause = getattr(cause, "cause", None) or cause  # a RayTaskError wraps what the worker raised
        # Ray hands the driver the worker's exception unpickled, without its __traceback__: the tracebacks are
        # then only in the error's own text (grouped over ranks by Ray)
        trace = "".join(traceback.format_exception(cause)) if cause.__traceback__ is not None else str(error)
        found.append((rank, type(cause).__name__, str(cause), trace, None))
    return rank_error(found, set())


def _connect(ray, address: str, num_workers: int) -> None:
    """ray.init for `--address`; a failure is one ConfigError naming the address and the fix."""
    try:
        # "local": always a new instance, never a cluster that RAY_ADDRESS or a `ray start` on this machine names
        local = address == "local"
        ray.init(address=address, num_cpus=num_workers if local else None, include_dashboard=False,
                 log_to_driver=True, runtime_env={"worker_process_setup_hook": _quiet_cleaner} if local else None)
    except Exception as e:  # noqa: BLE001 - ConnectionError, ValueError, RuntimeError, Ray's own: all say "no cluster"
        with contextlib.suppress(Exception):  # whatever a half-started Ray left
            ray.shutdown()
        text = str(e).strip()
        what = text.splitlines()[0] if text else type(e).__name__
        raise ConfigError(
            f"--address {address}: cannot connect to a Ray cluster ({what}): start one with `ray start --head` and "
            "pass its address (auto finds one started on this machine, ray://HOST:10001 a remote one), or use "
            "--address local to run on this machine only") from e


def _quiet_cleaner() -> None:
    """In each worker of a Ray started here: Ray Train's placement-group cleaner asks the state API, which needs
    the dashboard this instance runs without, about its controller every second, and warns each time it cannot
    (a screenful of warnings per minute of training). It still cleans up when the controller dies."""
    import logging

    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


def _node_resources(ray) -> list[dict]:
    """The resources of each live node of the cluster."""
    return [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive", n.get("alive", True))]


def _check_resources(total: dict, nodes: list[dict], *, address: str, num_workers: int, gpus_per_worker: float,
                     cpus_per_worker: float) -> None:
    """A ConfigError unless the cluster (`total`: ray.cluster_resources(), `nodes`: each live node's) can hold
    `num_workers` workers of `cpus_per_worker` CPUs and `gpus_per_worker` GPUs each: in total, and one worker
    on some node (a finer packing is left to Ray). An autoscaling cluster may still add nodes that would fit;
    refusing is still right, since Ray would otherwise wait for them with no message and no end."""
    def fmt(x: float) -> str:
        return f"{x:g}"

    has_gpu, has_cpu = float(total.get("GPU", 0)), float(total.get("CPU", 0))
    where = ("this machine (--address local)" if address == "local" else f"the Ray cluster at --address {address}")
    has = f"{where} has {fmt(has_gpu)} GPU(s) and {fmt(has_cpu)} CPU(s)"
    if gpus_per_worker > 0:
        need = num_workers * gpus_per_worker
        biggest = max((float(n.get("GPU", 0)) for n in nodes), default=has_gpu)
        if need > has_gpu or gpus_per_worker > biggest:
            why = (f"needs {fmt(need)} GPU(s)" if need > has_gpu else
                   f"needs {fmt(gpus_per_worker)} GPU(s) on one node, the most a node has is {fmt(biggest)}")
            more = ("run on a machine with GPUs, or start a Ray cluster with GPU nodes (`ray start --head`) and "
                    "pass its address" if address == "local" else
                    "add GPU nodes to the cluster (`ray start --address HEAD:PORT` on each)")
            raise ConfigError(
                f"--num-workers {num_workers} x --gpus-per-worker {fmt(gpus_per_worker)} {why}, but {has}: lower "
                f"--num-workers or --gpus-per-worker (--gpus-per-worker 0 runs CPU workers), or {more}")
    need = num_workers * cpus_per_worker
    if need > has_cpu:
        raise ConfigError(
            f"--num-workers {num_workers} needs {fmt(need)} CPU(s) ({fmt(cpus_per_worker)} per worker), but {has}: "
            "lower --num-workers, or add nodes to the cluster, or use --address local (as many CPUs as workers)")

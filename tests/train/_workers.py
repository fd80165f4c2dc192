"""Rank-side code for the training tests (module level, so the harness can pickle it)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from longctx import kernels
from longctx.config import load
from tests.support.backends import report

# a model and batch small enough for many layouts in one launch; clipping and warmup active, the copy task
# with its prompt labels ignored (so some context shards hold no real label at all)
BASE = ["model.dim=32", "model.ffn_dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.n_layers=2",
        "train.steps=5", "train.seq_len=64", "train.batch_size=4", "train.grad_clip=0.5", "train.warmup_steps=2",
        "train.loss_chunk=48", "data.task=copy", "logging.quiet=true", "logging.tensorboard=false"]


def config(*overrides, run_dir="/tmp/longctx-test-run") -> dict:
    return OmegaConf.to_container(load(overrides=[*BASE, f"run_dir={run_dir}", *overrides]))


def _deepspeed_shm_op():
    """Whether DeepSpeed's comm layer built its CPU shared-memory op (None: DeepSpeed's comm is not set up)."""
    import sys

    cdb = getattr(sys.modules.get("deepspeed.comm.comm"), "cdb", None)
    return None if cdb is None else cdb.shm_comm_op is not None


def _live_children() -> list[str]:
    """This rank's descendant processes still running (DataLoader workers must end with fit)."""
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                out.append(" ".join(p.cmdline())[:80])
        except psutil.NoSuchProcess:
            pass
    return out


def _group_timeouts() -> list[float]:
    """The distinct collective timeouts (seconds) of every process group this rank is in, read from each
    group's backend (gloo's on the CPU, NCCL's on a GPU): one value when every group has the job's."""
    from torch.distributed import distributed_c10d as c10d

    def timeout_s(group) -> float:
        device = torch.device("cuda" if dist.get_backend(group) == "nccl" else "cpu")
        return group._get_backend(device).options._timeout.total_seconds()

    return sorted({timeout_s(g) for g in c10d._world.pg_map})


def train_and_collect(configs: list[dict], stop_after: int | None | list = None) -> list[dict]:
    """Train each config in this process group; rank 0 returns losses, grad norms and the full final
    parameters, the other ranks what they held (saved bytes, label counts). `stop_after`: one value for
    every config, or a list with one per config."""
    from longctx.config import from_dict
    from longctx.train import Trainer

    out = []
    stops = stop_after if isinstance(stop_after, list) else [stop_after] * len(configs)
    for c, stop_after in zip(configs, stops, strict=True):
        trainer = Trainer(from_dict(c))
        shards = trainer.micro_batches(0)
        local_labels = sum(s["real_labels"] for s in shards)
        assert local_labels == sum(int((s["labels"] != -100).sum()) for s in shards)
        kernels.reset_calls()
        trainer.fit(stop_after)  # None: to train.steps; k: k steps and stop (as if the job were killed)
        params = trainer.full_state_dict()
        finite = all(bool(torch.isfinite(p).all()) for p in params.values())
        out.append({"losses": [r["loss"] for r in trainer.history], "grad_norms": [r["grad_norm"] for r in
                    trainer.history], "params": params if dist.get_rank() == 0 else None, "finite": finite,
                    "engine": trainer.plan.engine, "local_labels": local_labels, "backends": report(),
                    "steps": [r["step"] for r in trainer.history], "flops": [r["flops"] for r in trainer.history],
                    "lrs": [r["lr"] for r in trainer.history],
                    "groups": [(g["weight_decay"], tuple(g["betas"]), g["eps"])
                               for g in trainer.optimizer.param_groups],
                    "resumed_from": trainer.resumed_from, "initialized_from": trainer.initialized_from,
                    "ds_shm_op": _deepspeed_shm_op(),
                    "validation": {r["step"]: r["val_loss"] for r in trainer.history if "val_loss" in r},
                    "checkpoint": trainer.last_checkpoint, "children": _live_children(),
                    "group_timeouts": _group_timeouts()})
    return out


def train_and_print(config: dict) -> tuple[list[int], str]:
    """Train one config; the steps trained and what this rank printed (the harness relays children's output
    to the parent asynchronously, so the parent's capture cannot tell when it is complete)."""
    import contextlib
    import io

    from longctx.config import from_dict
    from longctx.train import Trainer

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer = Trainer(from_dict(config))
        trainer.fit()
    return [r["step"] for r in trainer.history], printed.getvalue()


def initial_params(configs: list[dict]) -> list[dict | None]:
    """Every config's parameters as its Trainer initialised them, unsharded (rank 0; None elsewhere)."""
    from longctx.config import from_dict
    from longctx.train import Trainer

    out = []
    for c in configs:
        params = Trainer(from_dict(c)).full_state_dict()
        out.append(params if dist.get_rank() == 0 else None)
    return out


def saved_bytes(config: dict) -> int:
    from longctx.config import from_dict
    from longctx.train import Trainer

    return Trainer(from_dict(config)).saved_activation_bytes()


def axis_bytes(configs: list[dict]) -> list[dict]:
    """Counted bytes per mesh axis of one micro-batch (Trainer.axis_bytes) next to the closed-form model."""
    from longctx.config import from_dict
    from longctx.train import Trainer
    from longctx.train.axis_bytes import step_axis_bytes

    out = []
    for c in configs:
        trainer = Trainer(from_dict(c))
        out.append({"counted": trainer.axis_bytes(), "model": step_axis_bytes(trainer.cfg, trainer.dims,
                                                                              trainer.plan.engine)})
    return out


def packed_batches(config_dict: dict, steps: int) -> dict:
    """Every rank's view of the packed token data for `steps` steps: the context shards unsharded over the
    cp group, and the documents each rank was handed; rank 0 of each cp group reports its data rank's."""
    from longctx.config import from_dict
    from longctx.parallel import unshard
    from longctx.train import Trainer

    trainer = Trainer(from_dict(config_dict))
    plan = trainer.plan
    cp_group = plan.mesh.group("cp") if plan.dims.cp > 1 else None
    got = []
    for step in range(steps):
        for shard in trainer.micro_batches(step):
            full = {}
            for key in ("input_ids", "labels"):
                full[key] = unshard(shard[key], plan.layout, group=cp_group) if cp_group is not None else shard[key]
            full["documents"] = shard["documents"].starts
            got.append(full)
    trainer.loader.close()
    return {"dp_rank": plan.dp_rank, "cp_rank": plan.cp_rank, "batches": got}


def resume_errors(configs: list[dict]) -> list[str]:
    """The ConfigError each config's Trainer raises while resuming (every rank raises the same)."""
    from longctx.config import ConfigError, from_dict
    from longctx.train import Trainer

    out = []
    for c in configs:
        try:
            Trainer(from_dict(c))
            out.append("no error")
        except ConfigError as e:
            out.append(str(e))
    return out


def stopped_by_signal(config: dict, signal_rank: int, at_step: int) -> dict:
    """Train while one rank sends itself SIGTERM during step `at_step`, as a scheduler would: every rank
    returns its summary and the steps it logged."""
    import os
    import signal

    from longctx.config import from_dict
    from longctx.train import Trainer

    trainer = Trainer(from_dict(config))
    step = trainer.train_step

    def train_step():
        if dist.get_rank() == signal_rank and trainer.step + 1 == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return step()

    trainer.train_step = train_step
    summary = trainer.fit()
    return {"summary": summary, "steps": [r["step"] for r in trainer.history]}


def tp_pieces(path: str, tp: int) -> dict:
    """A checkpoint loaded for evaluation with the model split over tp ranks: the whole weights, regathered."""
    from longctx.eval import load_checkpoint_model
    from longctx.parallel.dims import ParallelDims

    world = dist.get_world_size()
    mesh = ParallelDims(cp=world // tp, tp=tp, world_size=world).build_mesh()
    model, _ = load_checkpoint_model(path, log=lambda *a, **k: None, mesh=mesh)
    local = tuple(model.layers[0].attention.wq.weight.to_local().shape)
    return {"local_wq": local, "state": {k: v.full_tensor() for k, v in model.state_dict().items()}}


def train_with_nan(cases: list[tuple[dict, list[int]]]) -> list[dict]:
    """Train each config with rank 1's loss made NaN at the optimizer steps listed (1-based; rank 0 stays
    finite: the decision must come from the reduced norm; under pp=2 rank 1 is the last stage, the only one
    computing a loss). Rank 0 returns the Diverged message (or None), each step's grad norm, what it printed
    and the final parameters."""
    import contextlib
    import io

    from longctx.config import ConfigError, from_dict
    from longctx.train import Trainer

    out = []
    for c, bad_steps in cases:
        printed, error = io.StringIO(), None
        with contextlib.redirect_stdout(printed):
            trainer = Trainer(from_dict(c))
            finite_loss = trainer.loss_fn  # what every engine's step and the pipeline's last stage call

            def poisoned(*args, trainer=trainer, finite_loss=finite_loss, bad_steps=bad_steps, **kwargs):
                loss = finite_loss(*args, **kwargs)
                return loss * float("nan") if dist.get_rank() == 1 and trainer.step + 1 in bad_steps else loss

            trainer.loss_fn = poisoned
            try:
                trainer.fit()
            except ConfigError as e:
                error = f"{type(e).__name__}: {e}"
        params = trainer.full_state_dict()
        out.append({"error": error, "grad_norms": [r["grad_norm"] for r in trainer.history],
                    "printed": printed.getvalue(), "params": params if dist.get_rank() == 0 else None})
    return out


def resumed_batch(configs: list[dict]) -> list[dict]:
    """For each config (which resumes): its step, the sequence its stream continues at, and whether the first
    step's batch (one data rank) is the source's sequences from there; then it trains to its end."""
    from longctx.config import from_dict
    from longctx.train import Trainer

    out = []
    for c in configs:
        trainer = Trainer(from_dict(c))
        first, size = trainer.loader.batches.first_sequence, trainer.cfg.train.batch_size
        got = torch.cat([m["input_ids"] for m in trainer.loader.get(trainer.step)])
        trainer.fit()
        out.append({"step": trainer.history[0]["step"] - 1, "first_sequence": first,
                    "reads_on": torch.equal(got, trainer.data.batch(range(first, first + size))["input_ids"])})
    return out


def signalled_while_starting(config: dict) -> dict:
    """train_main while rank 0 receives SIGTERM as its Trainer is being built (model, checkpoint load): the
    summary of each rank, which must have stopped after its first step with a checkpoint, not died."""
    import os
    import signal

    from longctx.launch import train_main
    from longctx.train import Trainer

    build = Trainer.__init__

    def init(self, *args, **kwargs):
        if dist.get_rank() == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        build(self, *args, **kwargs)

    Trainer.__init__ = init
    try:
        return train_main(config)
    finally:
        Trainer.__init__ = build


def first_batch_unlabelled(config: dict) -> list[dict]:
    """Train with the first step's labels all ignored (a fully masked batch): the step records."""
    from longctx.config import from_dict
    from longctx.data.labels import IGNORE_INDEX
    from longctx.train import Trainer

    trainer = Trainer(from_dict(config))
    shards = trainer.micro_batches

    def micro_batches(step):
        out = shards(step)
        if step == 0:
            for shard in out:
                shard["labels"].fill_(IGNORE_INDEX)
                shard["real_labels"] = 0
        return out

    trainer.micro_batches = micro_batches
    trainer.fit()
    return trainer.history


def signalled_before_any_loop(enabled: bool) -> int:
    """A rank sends itself SIGTERM before any training loop listens (as in rendezvous), then opens a loop's
    scope: the signal that scope sees (the rank must not have died of it)."""
    import os
    import signal
    import time

    from longctx.train.stop import StopSignals

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    with StopSignals(enabled) as loop:
        return loop.received


def signalled_then_train(config: dict) -> dict:
    """SIGTERM before train_main (recorded: run(record_stops=True)), then train_main."""
    import os
    import signal
    import time

    from longctx.launch import train_main

    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
    return train_main(config)


def save_with_a_file_unread(config_dict: dict) -> dict:
    """Train with a checkpoint every step, rank 1 unable to read its share of the files back for their digests
    from the second save on (an I/O error, a file not yet visible over NFS). Each rank returns the error it
    raised and the checkpoint root's listing."""
    import os

    from longctx.config import from_dict
    from longctx.train import Trainer, checkpoint_dirs

    trainer = Trainer(from_dict(config_dict))
    trainer.fit(1)
    if dist.get_rank() == 1:
        checkpoint_dirs._sha256 = lambda full: "unreadable (OSError)"
    error = None
    try:
        trainer.fit()
    except OSError as e:
        error = str(e)
    dist.barrier()
    return {"error": error, "listing": sorted(os.listdir(trainer.checkpoint_dir))}


def train_into_a_held_root(config_dict: dict, when: str) -> dict:
    """Another run holds the checkpoint root (rank 0 locks it through an open file description of its own, as
    another process would): from before this run starts (`when="start"`), or only from after this run's start
    found no root yet (`"save"`, the first save then finds it taken). Each rank returns its error, the steps
    trained and what the root holds."""
    import fcntl
    import os

    from longctx.config import ConfigError, from_dict
    from longctx.train import Trainer, checkpoint_dirs

    checkpoint_dirs.HOLD_WAIT_S = 1.0
    root = from_dict(config_dict).checkpoint.dir

    def other_run_takes_it():
        if dist.get_rank() == 0:
            os.makedirs(root, exist_ok=True)
            fcntl.flock(os.open(root, os.O_RDONLY), fcntl.LOCK_EX | fcntl.LOCK_NB)
        dist.barrier()

    error, trainer = None, None
    try:
        if when == "start":
            other_run_takes_it()
        trainer = Trainer(from_dict(config_dict))
        if when == "save":
            other_run_takes_it()
        trainer.fit()
    except ConfigError as e:
        error = str(e)
    return {"error": error, "step": trainer and trainer.step, "listing": sorted(os.listdir(root))}

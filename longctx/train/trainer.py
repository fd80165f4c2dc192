"""The training loop: one loop for every launcher and every layout.

Per optimizer step, on every rank:
  1. read this data rank's sequences (each micro-batch), shard them with the plan (context layout);
  2. sum the real (not ignored) labels of all micro-batches over data x context ranks: the global count;
  3. per micro-batch: forward to the summed loss of this rank's tokens, backward on
     loss_sum * (dp x cp) / global_count; the data-parallel engine averages over dp x cp, so the gradient
     is exactly that of the global mean (docs/algorithms.md §11), whatever the layout, whichever ranks
     hold no real label; gradients are reduced once, on the last micro-batch (under a pipeline torch's
     stages reduce at the end of every schedule step: the same result, more traffic with accumulation);
  4. clip by the global norm, AdamW, LR schedule; metrics on rank 0.
The process group must exist already (longctx.launch sets it up); the trainer never creates one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time

import torch
import torch.distributed as dist

from ..config import to_yaml
from ..data import build_source
from ..data.labels import IGNORE_INDEX
from ..data.loader import StepBatches, StepLoader
from ..model import build_model, parallelize, parallelize_hf
from ..model.hf import load_hf_model
from ..model.hf_load import build_hf_on_meta, load_hf_pieces
from ..parallel import deepspeed_engine
from ..parallel.data_parallel import resolve_engine
from ..parallel.dims import device_type_from_env
from ..parallel.pipeline import build_pipeline, n_microbatches
from ..parallel.timeouts import match_world_timeout
from . import checkpoint, checkpoint_dirs, measure
from .init_from import init_weights
from .loss import loss_fn
from .machine import check_machine
from .metrics import (
    MetricsLogger,
    StepTimer,
    hf_layers_of,
    model_flops_per_step,
    packed_attention_work,
    peak_flops,
    peak_memory_bytes,
)
from .optim import build_optimizer, build_scheduler, clip_grad_norm
from .setup import default_run_dir, resolve_precision, validate_job
from .stop import NonFinite, StopSignals, signal_name
from .validate import Validation


class Trainer:
    def __init__(self, cfg, *, config_path: str | None = None):
        if not dist.is_initialized():
            raise RuntimeError("Trainer needs a process group: run it through `longctx train` / `longctx launch "
                               "local` (or longctx.launch.process_group())")
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.dims = validate_job(cfg, self.world)
        check_machine(cfg)
        self.device_type = device_type_from_env()
        self.device = (torch.device("cuda", torch.cuda.current_device()) if self.device_type == "cuda"
                       else torch.device("cpu"))
        self.precision = resolve_precision(cfg.train.precision, self.device_type)
        t = cfg.train
        torch.manual_seed(t.seed)  # anything transformers draws while loading an HF model is the same on every rank
        meta = cfg.parallel.meta_init
        bf16 = self.precision == "bf16"
        if cfg.model.hf_path:  # a Hugging Face model as it is (its own weights: the seed does not matter)
            # meta: split on the meta device, then each rank reads only its pieces from the safetensors
            model = build_hf_on_meta(cfg.model.hf_path) if meta else load_hf_model(cfg.model.hf_path).to(self.device)
            self.plan = parallelize_hf(model, self.dims, cfg.parallel, mesh=self.dims.build_mesh(self.device_type),
                                       param_dtype=torch.bfloat16 if bf16 else None, rope_length=t.seq_len)
            if meta:
                for module in self.plan.stages or [self.plan.model]:  # the same number of stages on every rank
                    load_hf_pieces(module.hf, cfg.model.hf_path, self.device, tied_pair=module.tied_names)
        else:  # the same initial weights on every rank, whatever the layout: init_weights(seed)
            mesh = self.dims.build_mesh(self.device_type)
            zero3_pieces = meta and resolve_engine(cfg.parallel.engine, self.dims) == "deepspeed"
            if zero3_pieces:  # DeepSpeed partitions each module as it is built (ZeRO-3's own meta init)
                model = deepspeed_engine.build_partitioned(
                    lambda: build_model(cfg.model, seq_len=t.seq_len, mlp_chunks=t.mlp_chunks), cfg, self.dims,
                    mesh, self.precision, t.seed)
            else:
                with torch.device("meta"):
                    model = build_model(cfg.model, seq_len=t.seq_len, mlp_chunks=t.mlp_chunks)
            if not meta:  # the whole model here, then split
                model.to_empty(device=self.device)
                model.init_weights(t.seed)
            self.plan = parallelize(model, self.dims, cfg.parallel, mesh=mesh,
                                    param_dtype=torch.bfloat16 if bf16 else None)
            if meta and not zero3_pieces:  # split on the meta device, then storage and values for this rank's pieces
                self.plan.materialize(self.device, t.seed)
        self.model = self.plan.model  # under pp > 1: a ModuleList of this rank's stages
        if self.dims.tp > 1:  # torch logs a GPU tuning hint on every 2-D norm reduction (FSDP x TP clipping)
            logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
        torch.manual_seed(t.seed + 1 + self.rank)  # per-rank streams from here on (sampling, dropout)
        self.optimizer = build_optimizer(self.model, t, self.device_type)
        self.scheduler = build_scheduler(self.optimizer, t)
        self.engine = None
        if self.plan.engine == "deepspeed":  # it wraps the optimizer: reduction, ZeRO, clipping, the step
            self.engine = deepspeed_engine.initialize(self.model, self.optimizer, cfg, self.plan, self.precision)
        self.pipeline = None
        if self.plan.stages:
            # validate_job checked the pipeline already; here only its microbatch count is needed
            self.pipeline = build_pipeline(self.plan.stages, self.plan.stage_ids, self.plan.n_stages,
                                           schedule=cfg.parallel.pp_schedule,
                                           microbatches=n_microbatches(self.dims.pp, cfg.parallel.microbatches),
                                           loss_fn=self._pipeline_loss, group=self.plan.pp_group, device=self.device)
            self._pp_scale = 1.0
        self.data = build_source(cfg.data, seq_len=t.seq_len, vocab_size=cfg.model.vocab_size, seed=t.seed,
                                 holdout=cfg.validation.holdout)
        self.loader = StepLoader(StepBatches(self.data, batch_size=t.batch_size, dp_rank=self.plan.dp_rank,
                                             dp_size=self.dims.dp, accumulation=t.accumulation), cfg.data.workers)
        self.loss_fn = loss_fn(t.loss_chunk)
        self.validation = Validation(self) if cfg.validation.interval else None
        self.last_validation = None  # the latest validation loss of this process's run
        self.hf_layers = hf_layers_of(cfg.model)  # a Hugging Face model's layers differ (windows, chunks, widths)
        self.step_flops = model_flops_per_step(cfg.model, t.seq_len, t.batch_size,
                                               layers=self.hf_layers)["total"]  # unless packed
        self.peak_flops = peak_flops(self.device, self.precision)
        self.step = 0
        self.history: list[dict] = []
        self.run_dir = self._agree_run_dir(config_path)
        self.checkpoint_dir = cfg.checkpoint.dir or os.path.join(self.run_dir, "checkpoints")
        self.last_checkpoint = None
        self.holds_checkpoint_root = False  # rank 0 locked checkpoint_dir against other runs (checkpoint.save)
        self.stop = StopSignals(cfg.checkpoint.on_signal)
        self.stop_signal = 0  # a SIGTERM / SIGUSR1 some rank received, agreed at the end of a step
        self._pending = None  # an asynchronous save in flight (checkpoint.async_save)
        self._checkpoint_group = None  # async saves coordinate over a group of their own, made on first use
        self.resumed_from = checkpoint_dirs.resume_path(t.resume, self.checkpoint_dir, self.rank, self.world, self._say)
        self.initialized_from = None  # train.init_from: another run's weights, only when starting fresh
        if self.resumed_from is not None:
            self.step = checkpoint.load(self, self.resumed_from)
            self._say(f"longctx: resumed from {self.resumed_from} at step {self.step}")
        elif t.init_from:
            self.initialized_from, its_step = init_weights(self, t.init_from)
            self._say(f"longctx: weights from {self.initialized_from}" + (f" (its step {its_step})" if its_step
                      else "") + "; the optimizer, LR schedule, step and data start afresh")

    # ------------------------------------------------------------------ set-up helpers
    def _agree_run_dir(self, config_path) -> str:
        """Rank 0 names the run directory (a timestamp may differ between ranks) and tells the others."""
        box = [self.cfg.run_dir or (default_run_dir(config_path) if self.rank == 0 else None)]
        if self.world > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def _say(self, text: str) -> None:
        if self.rank == 0:
            print(text, flush=True)

    def save_checkpoint(self) -> str:
        """A checkpoint of the current step in checkpoint_dir (collective); returns its path. With
        checkpoint.async_save it is written in the background and completed before the next save or at the
        end of fit (finish_checkpoint)."""
        self.finish_checkpoint()
        c = self.cfg.checkpoint
        if c.async_save and self._checkpoint_group is None:
            self._checkpoint_group = dist.new_group(backend="gloo")  # collective: every rank, same order
            match_world_timeout()
        result = checkpoint.save(self, self.checkpoint_dir, c.keep_last, async_save=c.async_save,
                                 group=self._checkpoint_group)
        if c.async_save:
            self._pending = result
            return result.final
        self.last_checkpoint = result
        return result

    def finish_checkpoint(self) -> None:
        """Complete an asynchronous save in flight, if any (collective)."""
        if self._pending is not None:
            self.last_checkpoint = self._pending.finish()
            self._pending = None

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device_type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _all_reduce(self, values: list[float], op=dist.ReduceOp.SUM, group=None, whole_world=False) -> list[float]:
        """Reduce a few scalars (float64) over `group` (None: nothing to reduce unless whole_world)."""
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if group is not None or (whole_world and self.world > 1):
            dist.all_reduce(t, op=op, group=group)
        return t.tolist()

    # ------------------------------------------------------------------ the step
    def micro_batches(self, step: int) -> list[dict]:
        """This rank's shards of every micro-batch of optimizer step `step`."""
        return self.shard_batches(self.loader.get(step))

    def shard_batches(self, batches: list[dict]) -> list[dict]:
        """This rank's shards of full micro-batches (cut on the host, then only the shard moves to the device),
        each with its count of real labels (a host number: no sync)."""
        t, plan = self.cfg.train, self.plan
        out = []
        for batch in batches:
            shard = plan.shard_batch(**batch)
            out.append({"input_ids": shard["input_ids"].to(self.device, non_blocking=True),
                        "labels": shard["labels"].to(self.device, non_blocking=True),
                        # the one position tensor the plan hands out per device: checked once, then reused
                        "position_ids": plan.positions(t.seq_len, self.device),
                        "documents": shard.get("documents"),
                        "real_labels": int((shard["labels"] != IGNORE_INDEX).sum())})
        return out

    def _loss(self, shard: dict) -> torch.Tensor:
        """The summed loss of one micro-batch shard on this rank."""
        # DeepSpeed's forward must go through its engine: ZeRO-3 counts micro-steps there, and without that
        # every accumulation micro-batch's gradient would replace the previous one instead of adding to it
        model = self.engine if self.engine is not None else self.model
        with self._autocast():
            return model(shard["input_ids"], shard["position_ids"], labels=shard["labels"], loss_fn=self.loss_fn,
                         **_documents(shard))

    def forward_loss(self, shard: dict) -> float:
        """The summed loss of one micro-batch shard, forward only (validation; call under no_grad). Under a
        pipeline: the loss on the last stage's ranks, 0 elsewhere."""
        if self.pipeline is None:
            return float(self._loss(shard))
        return self._pipeline_pass(shard, 1.0, backward=False)

    def _pipeline_loss(self, hidden, labels):
        """The pipeline schedule's loss_fn on the last stage, per pipeline microbatch: the summed loss scaled
        as the trainer's (dp x cp / global count). (torch also calls it once on placeholder tensors to infer
        gradient shapes, so the metrics read the schedule's returned losses, not a side sum.)"""
        return self.pipeline.last_stage.loss(hidden, labels, self.loss_fn) * self._pp_scale

    def _pipeline_pass(self, shard: dict, scale: float, backward: bool = True) -> float:
        """One micro-batch through the pipeline schedule (all its microbatches), forward and backward or
        forward only; returns the summed loss on the last stage's ranks, 0 elsewhere."""
        pipe = self.pipeline
        pipe.set_positions(shard["position_ids"], shard.get("documents"))
        self._pp_scale = scale
        args = (shard["input_ids"],) if pipe.has_first else ()
        losses: list = []
        kwargs = {"target": shard["labels"], "losses": losses} if pipe.has_last else {}
        with self._autocast():
            pipe.run(*args, backward=backward, **kwargs)
        return sum(float(x.detach()) for x in losses) / scale

    def train_step(self) -> dict:
        t, plan, model = self.cfg.train, self.plan, self.model
        with StepTimer(self.device) as timer:
            shards = self.micro_batches(self.step)
            local_count = float(sum(s["real_labels"] for s in shards))
            # packed batches: the attention work this data slice's documents allow, summed with the label
            # count (one collective); every context rank of a slice holds the same documents
            packed = shards[0].get("documents") is not None
            local_work = sum(packed_attention_work(self.cfg.model, self.hf_layers, s["documents"])
                             for s in shards) if packed else 0
            count, work = self._all_reduce([local_count, local_work / self.dims.cp], group=plan.loss_group)
            scale = self.dims.dp_cp / max(count, 1.0)
            loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
            for micro, s in enumerate(shards):
                plan.set_gradient_sync(micro == len(shards) - 1)
                if self.pipeline is not None:
                    loss_sum += self._pipeline_pass(s, scale)
                    continue
                part = self._loss(s)
                if self.engine is not None:  # DeepSpeed reduces (and, at the last micro-batch, steps)
                    self.engine.backward(part * scale, scale_wrt_gas=False)
                    self.engine.step()
                else:
                    (part * scale).backward()
                loss_sum += part.detach().double()
            if self.pipeline is not None:  # only the last stage's ranks hold the loss
                (pp_sum,) = self._all_reduce([float(loss_sum)], group=plan.pp_group)
                loss_sum.fill_(pp_sum)
            lr = self.optimizer.param_groups[0]["lr"]
            if self.engine is not None:
                grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
            else:
                if plan.tied is not None:  # the two copies of a tied weight: each gets the sum of both
                    plan.tied.sync_grads()
                grad_norm = float(clip_grad_norm(model.parameters(), t.grad_clip, pp_group=plan.pp_group,
                                                 uncounted=plan.tied.head if plan.tied is not None else None))
                if math.isfinite(grad_norm):  # the same global value on every rank: all withhold alike
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            (total,) = self._all_reduce([float(loss_sum)], group=plan.loss_group)
        # the largest peak memory, and whether any rank was told to stop: one collective for both
        peak, stop = self._all_reduce([float(peak_memory_bytes(self.device)), float(self.stop.received)],
                                      op=dist.ReduceOp.MAX, whole_world=True)
        self.stop_signal = int(stop)
        self.step += 1
        tokens = t.batch_size * t.seq_len
        step_flops = self.step_flops
        if packed:
            step_flops = model_flops_per_step(self.cfg.model, t.seq_len, t.batch_size, layers=self.hf_layers,
                                              work=round(work))["total"]
        flops_per_s = step_flops / timer.seconds
        record = {
            # a batch without one real label (a fully masked SFT batch) has no loss: NaN, as validation says, not 0
            "step": self.step, "loss": total / count if count else float("nan"), "lr": lr, "grad_norm": grad_norm,
            "tokens": tokens, "loss_tokens": int(count), "step_time_s": timer.seconds,
            "tokens_per_s": tokens / timer.seconds, "flops": step_flops, "flops_per_s": flops_per_s,
            "mfu": flops_per_s / self.world / self.peak_flops if self.peak_flops else None,
            "peak_mem_bytes": int(peak),
        }
        self.history.append(record)
        return record

    def saved_activation_bytes(self) -> int:
        """Bytes saved for backward by one micro-batch on this rank (measure.saved_activation_bytes)."""
        return measure.saved_activation_bytes(self)

    def axis_bytes(self) -> dict:
        """Bytes this rank sent per mesh axis in one micro-batch (measure.axis_bytes)."""
        return measure.axis_bytes(self)

    # ------------------------------------------------------------------ the run
    def fit(self, steps: int | None = None) -> dict:
        """Train to train.steps (or `steps` more); rank 0 logs. Returns a summary (the same on every rank)."""
        # resumed at or past train.steps: nothing to run, and the checkpoint resumed from is left as it is
        steps = max(0, self.cfg.train.steps - self.step if steps is None else steps)
        last_step = self.step + steps
        lcfg, main = self.cfg.logging, self.rank == 0
        if main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(self.cfg))
            if lcfg.print_config and not lcfg.quiet:
                print(f"longctx train: {self.world} rank(s), {self.dims}, engine={self.plan.engine}, "
                      f"device={self.device_type}, precision={self.precision}\n{to_yaml(self.cfg)}", flush=True)
        logger = MetricsLogger(self.run_dir, enabled=main, total_steps=steps, quiet=lcfg.quiet,
                               tensorboard=lcfg.tensorboard,
                               resumed_step=self.step)  # a fresh run's 0: an earlier run's records move aside
        start = time.perf_counter()
        interval = self.cfg.checkpoint.interval
        self.stop.received = self.stop_signal = 0
        nonfinite = NonFinite(self.cfg.train.skip_nonfinite)
        try:
            with self.stop:
                for _ in range(steps):
                    record = self.train_step()
                    if self.validation is not None and not self.stop_signal and self.validation.due(self.step,
                                                                                                    last_step):
                        record.update(self.validation.run(self))
                        self.last_validation = record["val_loss"]
                    logger.log(record)
                    if not math.isfinite(record["grad_norm"]):  # (every rank alike) a save in flight completes
                        self.finish_checkpoint()
                    warning = nonfinite.check(record, self.last_checkpoint or self.resumed_from)
                    if warning:
                        self._say(warning)
                    if self.stop_signal:  # every rank saw it in the step's all-reduce: all leave here
                        break
                    if interval and self.step % interval == 0:
                        self.save_checkpoint()
                # the end of the run is always kept, and so is the step a signal stopped at
                if (interval and steps and self.step % interval) or self.stop_signal:
                    self.save_checkpoint()
                self.finish_checkpoint()
        finally:
            logger.close()
            self.loader.close()  # worker processes end with the run
        if self.stop_signal:
            self._say(f"longctx: {signal_name(self.stop_signal)} received: stopped after step {self.step}, "
                      f"checkpoint {self.last_checkpoint}; continue with train.resume=auto run_dir={self.run_dir}")
        return self.summary(time.perf_counter() - start)

    def summary(self, seconds: float) -> dict:
        h = self.history
        timed = h[1:] or h  # the first step pays for warm-up
        return {
            "steps": self.step, "first_loss": h[0]["loss"] if h else None, "final_loss": h[-1]["loss"] if h else None,
            "losses": [r["loss"] for r in h], "seconds": seconds,
            "tokens_per_s": sum(r["tokens"] for r in timed) / sum(r["step_time_s"] for r in timed) if h else None,
            "flops_per_s": sum(r["flops_per_s"] for r in timed) / len(timed) if h else None,
            "mfu": sum(r["mfu"] for r in timed) / len(timed) if h and timed[-1]["mfu"] is not None else None,
            "peak_mem_bytes": max((r["peak_mem_bytes"] for r in h), default=0),
            "run_dir": self.run_dir, "world_size": self.world, "engine": self.plan.engine,
            "checkpoint": self.last_checkpoint, "resumed_from": self.resumed_from, "val_loss": self.last_validation,
            "layout": self.dims.layout if self.dims.cp > 1 else None,
            "stop_signal": self.stop_signal, "stopped_by": signal_name(self.stop_signal) if self.stop_signal else None,
        }

    def full_state_dict(self) -> dict:
        """Every parameter, unsharded, on every rank (collective); pipeline stages are gathered over pp."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        if self.engine is not None:
            return deepspeed_engine.full_state_dict(self.engine)
        full = {}
        for module in self.plan.stages or [self.model]:
            sd = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True))
            full.update({k: v.detach().cpu() for k, v in sd.items()})
        if self.plan.stages and self.plan.pp_group is not None:
            parts = [None] * self.dims.pp
            dist.all_gather_object(parts, full, group=self.plan.pp_group)
            full = {k: v for part in parts for k, v in part.items()}
        return full


def _documents(shard: dict) -> dict:
    """The documents keyword only when the batch is packed (DeepSpeed's engine forwards kwargs as given)."""
    return {} if shard.get("documents") is None else {"documents": shard["documents"]}

"""Checkpoints with torch.distributed.checkpoint (DCP): sharded, reshardable, and never half-written.

A checkpoint is a directory `step_00000012/` holding DCP's files (model and optimizer state, each rank
writing its own shards), `trainer.pt` (LR schedule, step, the dims it was written with), `rng_rank{r}.pt`
(every rank's generator) and `config.yaml` (the resolved config). It is written into `step_...tmp/`; once
every rank has finished, the ranks share out reading the files for their SHA-256 digests, and rank 0 lists
every file with its size and digest in a `COMPLETE` marker and renames the directory into place, so a reader
sees a complete checkpoint or none. Listing checks the marker's sizes against the disk (a missing or
truncated file means the checkpoint is skipped, with a message); the one chosen to resume from has its
contents checked against the digests before any is loaded, a damaged one being skipped for the previous.
DCP reshards: a checkpoint written at cp=4 loads at dp_shard=2 x cp=2 or on
another world size, and one written by pipeline stages loads on another pipeline layout or none (saved
names are the unsplit model's, the optimizer state keyed per parameter). The data position is the number
of sequences consumed (every data source is a function of the sequence index), recorded in trainer.pt
with the source, so a run resumed with another global batch size continues where the checkpoint stopped.
Everything is read with `torch.load(weights_only=True)`.

With parallel.engine=deepspeed the model and optimizer state are DeepSpeed's own checkpoint (`deepspeed/`,
ZeRO-partitioned, read back weights-only through `deepspeed_engine`) plus `model.pt`, the full fp32 weights
for export and evaluation, and `optimizer.pt`, the full Adam states; the rest (marker, rename, trainer.pt,
RNG, config) is the same. DeepSpeed's files fit only the layout, ZeRO stage and precision that wrote them;
under others, or under the torch engines, the checkpoint resumes from the two full files, and a DCP
checkpoint resumes under DeepSpeed from its per-parameter entries read whole (`_load_full`).
"""

from __future__ import annotations

import os
import re
import shutil

import torch
import torch.distributed as dist

from ..config import ConfigError
from ..data.tokens import identity
from .checkpoint_dirs import check_digests, decided_by_rank0, files_under, hold_root, seal, shared_digests, step_dir
from .checkpoint_read import Mismatch, load_file, read_dcp, saved_entries, telling_line
from .optim import apply_settings
from .same_run import HF_CONFIG, check_same_run, model_changes

FULL_OPTIMIZER = "optimizer.pt"  # a DeepSpeed checkpoint's Adam states, unsharded: it resumes on any layout
# the resolved engine (plan.engine) in words: "none" is no value of parallel.engine
_ENGINE_WORDS = {"none": "one data rank (no data-parallel engine)", "ddp": "DDP", "fsdp": "FSDP2",
                 "hsdp": "HSDP (FSDP2)"}


def _barrier():
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def flat_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # the optimizer state keyed per parameter ("state.<name>.exp_avg", "param_groups.<name>.lr"): pipeline
    # ranks hold different parameters, and one nested param_groups list per rank would be saved once (one
    # rank's) and handed to every rank on load
    return StateDictOptions(flatten_optimizer_state_dict=True)


_STAGE_INDEX = re.compile(r"^((?:state|param_groups)\.)?\d+\.")


def saved_name(trainer, name: str, optim: bool = False) -> str:
    """This rank's name of a parameter (or its optimizer entry) -> the unsplit model's: without the stage index.
    With `optim`, the last stage's copy of a tied head (parallel.tied) -> the embedding's name: the unsplit
    model's optimizer holds the tied weight once, under that name (and both copies' Adam states are equal)."""
    name = _STAGE_INDEX.sub(r"\1", name) if trainer.plan.stages else name
    tied = trainer.plan.tied
    if optim and tied is not None:
        for lead in ("", "state.", "param_groups."):
            head = lead + tied.head_name
            if name == head or name.startswith(head + "."):
                return lead + tied.embedding_name + name[len(head):]
    return name


def dcp_state(trainer) -> tuple[dict, dict]:
    """(the state DCP saves and loads, {this rank's name: the saved name} for each of "model" and "optim").
    Pipeline stages keep their layers' global names, so a name without the stage's index in this rank's
    list of stages ("0.layers.3.attention.wq.weight" -> "layers.3.attention.wq.weight") is the unsplit
    model's: the checkpoint resumes on another pipeline layout, or without one."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    optimizer = trainer.optimizer
    if not optimizer.state:
        # get_state_dict fills an empty optimizer state (before the first applied update: a skipped non-finite
        # step, or a load) by a step of zero gradients at lr 0, which counts one step: Adam's bias correction
        # would then be a step behind for the rest of the run. Back to step 0 (its moments are zero), the state
        # is a fresh one's, and the state saved and trained with is that.
        get_state_dict(trainer.model, optimizer, options=flat_options())
        for param_state in optimizer.state.values():
            if "step" in param_state:
                step = param_state["step"]
                param_state["step"] = step.zero_() if isinstance(step, torch.Tensor) else 0
    parts = dict(zip(("model", "optim"), get_state_dict(trainer.model, optimizer, options=flat_options())))
    saved_as = {part: {key: saved_name(trainer, key, optim=part == "optim") for key in values}
                for part, values in parts.items()}
    state = {part: {saved_as[part][key]: value for key, value in values.items()} for part, values in parts.items()}
    # a tied pair's optimizer entries may meet under one name (equal values); any other meeting is a bug
    if any(len({saved_name(trainer, key) for key in values}) != len(values) for values in parts.values()):
        raise RuntimeError("two pipeline stages of this rank hold parameters of the same name")
    return state, saved_as


class Pending:
    """An asynchronous save in flight: DCP has staged the state in host memory and writes it in the background;
    `finish()` (collective) waits for the files, then marks and renames the checkpoint."""

    def __init__(self, future, rank: int, step: int, tmp: str, final: str, root: str, keep_last: int):
        self.future, self.rank, self.step, self.tmp, self.final = future, rank, step, tmp, final
        self.root, self.keep_last = root, keep_last

    def finish(self) -> str:
        self.future.result()
        _commit(self.rank, self.step, self.tmp, self.final, self.root, self.keep_last)
        return self.final


def save(trainer, root: str, keep_last: int, *, async_save: bool = False, group=None):
    """Write a checkpoint of the trainer's current step (collective); returns its directory, or with
    async_save a Pending whose finish() completes it (training may go on meanwhile). An asynchronous save
    coordinates over its own `group`: its background collectives must not interleave with training's."""
    import torch.distributed.checkpoint as dcp

    from ..config import to_yaml

    if not trainer.holds_checkpoint_root:  # rank 0 locks the root (no other run writes it), told to every rank
        # (an OSError making the root is a failed save like any other, its traceback kept)
        decided_by_rank0(lambda: hold_root(root), trainer.rank, trainer.world, (ValueError,))
        trainer.holds_checkpoint_root = True
    final = step_dir(root, trainer.step)
    tmp = final + ".tmp"
    if trainer.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted save of this step
        os.makedirs(tmp)
    _barrier()
    torch.save({"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if trainer.device_type == "cuda" else None},
               os.path.join(tmp, f"rng_rank{trainer.rank}.pt"))
    if trainer.rank == 0:
        # the data position: every source maps sequence indices to sequences
        data = {"source": trainer.cfg.data.source, "path": trainer.cfg.data.path,
                "holdout": trainer.cfg.validation.holdout,
                "sequences_consumed": trainer.loader.batches.sequences_before(trainer.step),
                "seq_len": trainer.cfg.train.seq_len}
        if trainer.cfg.data.source == "tokens":  # what the windows were cut from, to notice a re-prepared path
            data["dataset"] = identity(trainer.data.meta)
        torch.save({"scheduler": trainer.scheduler.state_dict(), "step": trainer.step, "world_size": trainer.world,
                    "dims": repr(trainer.dims), "data": data, "format": _format(trainer)},
                   os.path.join(tmp, "trainer.pt"))
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(to_yaml(trainer.cfg))
        if trainer.cfg.model.hf_path:  # what the Hugging Face model computes with, beyond the sizes config.yaml has
            shutil.copyfile(os.path.join(trainer.cfg.model.hf_path, "config.json"), os.path.join(tmp, HF_CONFIG))
    if trainer.engine is not None:
        from ..parallel import deepspeed_engine

        deepspeed_engine.save(trainer.engine, tmp)
        weights = deepspeed_engine.full_state_dict(trainer.engine, rank0_only=True)  # collective under ZeRO-3
        states, opt_step = deepspeed_engine.full_optimizer_state(trainer.engine, rank0_only=True)  # collective
        if trainer.rank == 0:
            torch.save(weights, os.path.join(tmp, "model.pt"))
            torch.save({"step": opt_step, "state": states}, os.path.join(tmp, FULL_OPTIMIZER))
        _commit(trainer.rank, trainer.step, tmp, final, root, keep_last)
        return final
    if async_save:  # the state is copied to host memory before this returns: later steps cannot change it
        future = dcp.async_save(dcp_state(trainer)[0], checkpoint_id=tmp, process_group=group)
        return Pending(future, trainer.rank, trainer.step, tmp, final, root, keep_last)
    dcp.save(dcp_state(trainer)[0], checkpoint_id=tmp)
    _commit(trainer.rank, trainer.step, tmp, final, root, keep_last)
    return final


def _commit(rank: int, step: int, tmp: str, final: str, root: str, keep_last: int) -> None:
    _barrier()  # every rank's files are on disk before the marker says so
    world = dist.get_world_size() if dist.is_initialized() else 1
    # every rank reads a share of the files for their digests (rank 0 alone would read the whole checkpoint)
    digests = shared_digests(tmp, list(files_under(tmp)), rank, world)
    check_digests(tmp, digests)  # (on every rank: each holds every digest)
    if rank == 0:
        seal(tmp, final, root, step, keep_last, digests)
    _barrier()


def load(trainer, path: str) -> int:
    """Load a checkpoint into the trainer (collective, any layout); returns its step."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    meta = load_file(path, "trainer.pt")
    full = _check_format(meta, trainer, path)
    _continue_data(trainer, path, meta)
    if full:
        trainer._say(f"longctx: resuming {path} from its full states ({full})")
        _load_full(trainer, path, meta.get("format", {"kind": "dcp"})["kind"])
    elif trainer.engine is not None:
        _load_deepspeed(trainer, path)
    else:
        state, saved_as = dcp_state(trainer)
        try:
            read_dcp(state, path)
        except Mismatch as e:
            raise unfit_error(trainer, path, e.detail) from None
        mine = {part: {key: state[part][saved] for key, saved in saved_as[part].items()} for part in state}
        set_state_dict(trainer.model, trainer.optimizer, model_state_dict=mine["model"],
                       optim_state_dict=mine["optim"], options=flat_options())
    trainer.scheduler.load_state_dict(meta["scheduler"])
    apply_settings(trainer.optimizer, trainer.scheduler, trainer.cfg.train)  # the step's, this run's settings
    rng = f"rng_rank{trainer.rank}.pt"
    # on another world size every rank starts a fresh stream
    if meta["world_size"] == trainer.world and os.path.exists(os.path.join(path, rng)):
        r = load_file(path, rng)
        torch.set_rng_state(r["cpu"])
        if r["cuda"] is not None and trainer.device_type == "cuda":
            torch.cuda.set_rng_state(r["cuda"])
    check_same_run(trainer, path)
    return int(meta["step"])


def _continue_data(trainer, path: str, meta: dict) -> None:
    """The data stream continues at the sequences the checkpoint consumed, whatever this run's batch size (a
    global batch that changed with the world size read from step x new batch size: skipped or repeated
    sequences); what changes the windows themselves is said."""
    data, t = meta.get("data", {}), trainer.cfg.train
    batches = trainer.loader.batches
    batches.first_step = int(meta["step"])
    batches.first_sequence = int(data.get("sequences_consumed", batches.first_step * t.batch_size))
    if batches.first_sequence != batches.first_step * t.batch_size:
        trainer._say(f"longctx: data continues at sequence {batches.first_sequence} (consumed by the checkpoint's "
                     f"{batches.first_step} steps), {t.batch_size} sequences per step from here")
    if trainer.cfg.data.source != "tokens":
        return
    held, length = data.get("holdout", 0), data.get("seq_len", t.seq_len)
    if held != trainer.cfg.validation.holdout or length != t.seq_len:
        trainer._say(f"longctx: warning: {path} trained with validation.holdout={held} and train.seq_len={length}, "
                     f"this run with {trainer.cfg.validation.holdout} and {t.seq_len}: the training windows (and "
                     f"their order) change")
    saved, now = data.get("dataset"), identity(trainer.data.meta)  # the meta.json this run's source read
    if saved is not None and saved != now:
        changed = ", ".join(f"{k} {saved.get(k)} -> {now[k]}" for k in now if saved.get(k) != now[k])
        trainer._say(f"longctx: warning: data.path={trainer.cfg.data.path!r} is not the dataset {path} trained on "
                     f"({changed}): prepared again since, its windows and their order differ, so the rest of "
                     "the epoch repeats some sequences and skips others")


def _format(trainer) -> dict:
    if trainer.engine is None:
        return {"kind": "dcp"}
    return {"kind": "deepspeed", "zero_stage": int(trainer.cfg.parallel.zero_stage), "dims": repr(trainer.dims),
            "precision": trainer.precision}


def _check_format(meta: dict, trainer, path: str) -> str | None:
    """None when the checkpoint's own files fit this run (DCP under the torch engines, DeepSpeed's under the
    layout, ZeRO stage and precision that wrote them); otherwise why it resumes from its full states
    (`_load_full`), or a ConfigError when it has none (written before they were kept)."""
    saved, here = meta.get("format", {"kind": "dcp"}), _format(trainer)
    config = os.path.join(path, "config.yaml")
    if saved["kind"] == here["kind"] == "dcp":
        return None
    if saved["kind"] == "dcp":
        why = f"written by parallel.engine={_engine_of(config)} (DCP), resumed under parallel.engine=deepspeed"
        if _dcp_full_optimizer(path) is None:
            raise ConfigError(f"checkpoint {path} was {why}, but its optimizer state is saved nested (it predates "
                              f"per-parameter keys); resume it with the engine it was written with")
        return why
    written = (saved["zero_stage"], saved["dims"], saved.get("precision", trainer.precision))
    if here["kind"] == "deepspeed" and written == (here["zero_stage"], here["dims"], here["precision"]):
        return None
    why = (f"written by DeepSpeed ZeRO-{written[0]} on {written[1]} in {written[2]}, resumed as "
           + (f"ZeRO-{here['zero_stage']} on {here['dims']} in {here['precision']}" if here["kind"] == "deepspeed"
              else f"{_ENGINE_WORDS.get(trainer.plan.engine, trainer.plan.engine)} on {trainer.dims}"))
    if not os.path.isfile(os.path.join(path, FULL_OPTIMIZER)):
        raise ConfigError(f"checkpoint {path} was {why}: its DeepSpeed files resume only on the layout, ZeRO "
                          f"stage and precision that wrote them, and it has no {FULL_OPTIMIZER} (it predates "
                          f"resharding); resume with the config in {config}")
    return why


def _dcp_full_optimizer(path: str) -> dict | None:
    """{saved key: its metadata} of a DCP checkpoint's model weights and per-parameter Adam states; None if
    the optimizer state was saved nested."""
    saved = saved_entries(path)
    if not any(k.startswith("optim.state.") and k.endswith(".exp_avg") for k in saved):
        return None
    return {k: md for k, md in saved.items() if k.startswith("model.") or (
        k.startswith("optim.state.") and k.rsplit(".", 1)[1] in ("exp_avg", "exp_avg_sq", "step"))}


def _engine_of(config_path: str) -> str:
    from ..config import load as load_config

    try:
        return load_config(path=config_path).parallel.engine
    except Exception:  # noqa: BLE001 - only for the message
        return "torch"


def _load_full(trainer, path: str, kind: str) -> None:
    """The full (unsharded) master weights and Adam states of a checkpoint put into this run's pieces: a
    DeepSpeed checkpoint's model.pt and optimizer.pt, or a DCP checkpoint's entries read whole, into a
    DeepSpeed engine (`deepspeed_engine.load_full_state`) or the torch engines' model (`set_state_dict`
    with full tensors). Every rank reads every full tensor (memory-mapped for DeepSpeed's files)."""
    if kind == "deepspeed":
        weights = load_file(path, "model.pt", mmap=True)
        saved = load_file(path, FULL_OPTIMIZER, mmap=True)
        states, step = saved["state"], saved["step"]
    else:
        entries = _dcp_full_optimizer(path)
        flat = {k: torch.empty(md.size, dtype=md.properties.dtype) for k, md in entries.items()}
        read_dcp(flat, path)
        weights = {k.removeprefix("model."): v for k, v in flat.items() if k.startswith("model.")}
        states, steps = {}, set()
        for k, v in flat.items():
            if k.startswith("optim.state."):
                name, _, key = k.removeprefix("optim.state.").rpartition(".")
                if key == "step":
                    steps.add(int(v))
                else:
                    states.setdefault(name, {})[key] = v
        step = steps.pop()
    check_fits(trainer, path, weights, states)
    if trainer.engine is not None:
        from ..parallel import deepspeed_engine

        deepspeed_engine.load_full_state(trainer.engine, weights, states, step)
        return
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_state_dict,
    )

    model_sd = {key: weights[saved_name(trainer, key)] for key in get_model_state_dict(trainer.model)}
    current = get_optimizer_state_dict(trainer.model, trainer.optimizer)  # its param groups: this run's settings
    optim_sd = {"param_groups": current["param_groups"],
                "state": {fqn: {"step": torch.tensor(float(step)), **states[saved_name(trainer, fqn, optim=True)]}
                          for fqn in current["state"]}}
    set_state_dict(trainer.model, trainer.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True))


def check_fits(trainer, path: str, weights: dict, states: dict | None = None, fix: str | None = None) -> None:
    """Full weights (and Adam states) by the unsplit model's names that fit every parameter of this run."""
    if trainer.engine is not None:
        shapes = {n: getattr(p, "ds_shape", p.shape) for n, p in trainer.engine.module.named_parameters()}
    else:
        shapes = {n: p.shape for m in trainer.plan.stages or [trainer.model] for n, p in m.named_parameters()}
    unfit = [n for n, shape in shapes.items()
             if n not in weights or (states is not None and saved_name(trainer, n, optim=True) not in states)
             or tuple(weights[n].shape) != tuple(shape)]
    if unfit:
        raise unfit_error(trainer, path, f"{unfit[0]} is missing or has another shape", fix)


def _load_deepspeed(trainer, path: str) -> None:
    """DeepSpeed's own files, on the layout, stage and precision that wrote them."""
    from ..parallel import deepspeed_engine

    try:
        deepspeed_engine.load(trainer.engine, path)
    except (RuntimeError, KeyError) as e:  # load_state_dict's strict check names the parameters and shapes;
        # the files' digests held, so what does not load was written for another model
        raise unfit_error(trainer, path, telling_line(e)) from None


def unfit_error(trainer, path: str, detail: str, fix: str | None = None) -> ConfigError:
    """A checkpoint whose weights do not fit this run's model, naming the model settings that differ."""
    changes = model_changes(path, trainer.cfg.model)
    why = f"it was written with {changes}" if changes else "a different model shape?"
    fix = fix or f"resume with the config it was written with ({os.path.join(path, 'config.yaml')})"
    return ConfigError(f"checkpoint {path} does not fit this model: {detail[:300]} ({why}); {fix}")

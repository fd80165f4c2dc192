"""DeepSpeed ZeRO (stages 1-3) as the data-parallel engine (`parallel.engine=deepspeed`).

Its data-parallel group is the data x context group (`dp_cp`): context ranks hold different tokens of the
same sequences, so their gradients are summed with the data ranks' exactly as under FSDP2. DeepSpeed learns
that group through `mpu=` (an object that answers for the data- and model-parallel groups). Our trainer keeps
its loop, loss normalisation and metrics; DeepSpeed owns the reduction, ZeRO partitioning, clipping and the
optimizer step. Its config is generated from ours (`ds_config`) and can be overridden key by key by a JSON
file (`parallel.deepspeed_config`).

Supported here: ZeRO 1, 2, 3 with any context-parallel strategy and data parallelism, and at ZeRO-3 a model
built in pieces (`parallel.meta_init`: deepspeed.zero.Init, `build_partitioned`). Not with tp or pp:
DeepSpeed's tensor/pipeline parallelism are separate engines with their own model wrappers; use
`parallel.engine=torch` (FSDP2) for those. Defaults that would silently change results are set explicitly:
DeepSpeed clips gradients at 1.0 unless told otherwise, so `gradient_clipping` is always train.grad_clip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re

STAGES = (1, 2, 3)


def check_deepspeed(dims, p) -> None:
    """Every constraint of parallel.engine=deepspeed (ValueError naming the key and the fix)."""
    if dims.tp > 1 or dims.pp > 1:
        axis = "tp" if dims.tp > 1 else "pp"
        raise ValueError(f"parallel.engine=deepspeed with parallel.{axis}={getattr(dims, axis)} is not supported: "
                         f"ZeRO runs here over the data x context ranks only (DeepSpeed's own tensor/pipeline "
                         f"engines are separate); use parallel.engine=torch for tp/pp, or set parallel.{axis}=1")
    if p.zero_stage not in STAGES:
        raise ValueError(f"parallel.zero_stage={p.zero_stage!r}: choose 1, 2 or 3")
    if p.meta_init and p.zero_stage != 3:
        raise ValueError(f"parallel.meta_init=true with parallel.engine=deepspeed needs parallel.zero_stage=3 (ZeRO "
                         f"{p.zero_stage} keeps the whole model on every rank, so there is nothing to build in "
                         "pieces); set zero_stage=3 or meta_init=false")
    if p.deepspeed_config is not None:
        _read_overrides(p.deepspeed_config)
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError("parallel.engine=deepspeed needs DeepSpeed: pip install 'longctx[deepspeed]'")


# DeepSpeed keys longctx derives from its own config (dotted: a key inside a section), and what to set instead:
# overriding them would desynchronise DeepSpeed's step boundaries, loss scaling, clipping, optimizer or LR schedule
# from the trainer's
OWNED = {"train_micro_batch_size_per_gpu": "train.batch_size", "gradient_accumulation_steps": "train.accumulation",
         "train_batch_size": "train.batch_size", "gradient_clipping": "train.grad_clip",
         "optimizer": "train.lr / weight_decay / beta1 / beta2",
         "scheduler": "train.lr_schedule / warmup_steps / decay_steps / min_lr_ratio",
         "bf16": "train.precision", "fp16": "train.precision", "torch_autocast": "train.precision",
         "amp": "train.precision",
         # a stage set here would run (and checkpoint) as it while the run records parallel.zero_stage's
         "zero_optimization.stage": "parallel.zero_stage",
         # the optimizer is torch's AdamW (train/optim.py), offloaded or not: DeepSpeed must take it as it is
         "zero_allow_untested_optimizer": "train.lr / weight_decay / beta1 / beta2 (longctx steps torch's AdamW)",
         "zero_force_ds_cpu_optimizer": "train.lr / weight_decay / beta1 / beta2 (longctx steps torch's AdamW)",
         "checkpoint": "checkpoint.* (longctx writes DeepSpeed's checkpoints synchronously with its torch engine and "
                       "commits them atomically; an asynchronous writer would be committed half-written)"}


def _key_paths(section: dict, prefix: str = ""):
    """Every key of a JSON object, nested ones dotted (zero_optimization.stage)."""
    for key, value in section.items():
        yield prefix + key
        if isinstance(value, dict):
            yield from _key_paths(value, f"{prefix}{key}.")


def _read_overrides(path: str) -> dict:
    if not os.path.isfile(path):
        raise ValueError(f"parallel.deepspeed_config={path!r} is not a file; give a JSON file of DeepSpeed config "
                         "keys, or leave it unset")
    try:
        with open(path) as f:
            extra = json.load(f)
    except ValueError as e:
        raise ValueError(f"parallel.deepspeed_config={path!r} is not valid JSON: {e}") from None
    if not isinstance(extra, dict):
        raise ValueError(f"parallel.deepspeed_config={path!r} must hold a JSON object of DeepSpeed keys")
    owned = sorted(k for k in _key_paths(extra) if k in OWNED)
    if owned:
        raise ValueError(f"parallel.deepspeed_config={path!r} sets {', '.join(owned)}, which longctx derives from "
                         f"{'; '.join(dict.fromkeys(OWNED[k] for k in owned))}: set those keys instead")
    return extra


def ds_config(cfg, dims, precision: str = "fp32") -> dict:
    """DeepSpeed's config for our job: batch bookkeeping over its data-parallel group (dp x cp ranks),
    ZeRO stage, clipping, precision; then the JSON file's keys on top (nested dicts merged)."""
    t, p = cfg.train, cfg.parallel
    micro = t.batch_size // (dims.dp * t.accumulation)
    conf = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": t.accumulation,
        "train_batch_size": micro * t.accumulation * dims.dp_cp,  # DeepSpeed counts its group, cp ranks included
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": int(p.zero_stage)},
        "bf16": {"enabled": precision == "bf16"},  # the resolved precision (train.precision=auto: by device)
        "zero_allow_untested_optimizer": True,  # torch's AdamW, built by longctx.train.optim
        "zero_force_ds_cpu_optimizer": False,  # and also where the JSON offloads it (DeepSpeed would demand its own)
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if p.deepspeed_config:
        _merge(conf, _read_overrides(p.deepspeed_config))
    return conf


def _merge(base: dict, extra: dict) -> None:
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            _merge(base[k], v)
        else:
            base[k] = v


class _MPU:
    """What DeepSpeed asks of a model-parallel unit: the data-parallel group is dp x cp, no model parallelism."""

    def __init__(self, mesh):
        self._dp = mesh.dp_cp
        self._mp = mesh.world["tp"]  # size 1 here (tp is refused): every rank its own model-parallel group

    def get_data_parallel_group(self):
        return self._dp.get_group()

    def get_data_parallel_world_size(self):
        return self._dp.size()

    def get_data_parallel_rank(self):
        return self._dp.get_local_rank()

    def get_model_parallel_group(self):
        return self._mp.get_group()

    def get_model_parallel_world_size(self):
        return 1

    def get_model_parallel_rank(self):
        return 0


def _skip_inference_comm_op() -> None:
    """On CPU, DeepSpeed's comm layer JIT-compiles a shared-memory all-reduce op (g++ and ninja, over a minute on
    a cold cache) that only its inference all-reduce uses; training never calls it, so it is marked
    unavailable (DeepSpeed then uses the process group's all-reduce, as it does without a compiler)."""
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        ops = deepspeed.ops.__compatible_ops__  # probed once, kept in the module: an edit persists
        if isinstance(ops, dict):
            ops["deepspeed_shm_comm"] = False


def _init_comm() -> None:
    """DeepSpeed's comm layer over our process group (idempotent)."""
    import deepspeed

    _skip_inference_comm_op()
    deepspeed.init_distributed(dist_init_required=False, verbose=False)


def build_partitioned(build, cfg, dims, mesh, precision: str, seed: int):
    """ZeRO-3's own meta init (`parallel.meta_init` with DeepSpeed): `build()` runs inside deepspeed.zero.Init,
    which partitions each module's parameters over the dp x cp ranks as soon as the module is constructed, so
    no rank ever holds the whole model. Then every parameter gets longctx's layout-independent initial value
    (Transformer.init_weights: drawn whole from its own seeded generator) and keeps its partition, with no
    communication: the same initial weights as every other layout."""
    import deepspeed

    _init_comm()
    with deepspeed.zero.Init(config_dict_or_path=ds_config(cfg, dims, precision), mpu=_MPU(mesh),
                             data_parallel_group=mesh.dp_cp.get_group()):
        model = build()

    model.init_weights(seed, write=_write_partition, full_shape=lambda param: param.ds_shape)
    return model


def _write_partition(param, full) -> None:
    """This rank's ZeRO-3 partition of `full` (every rank drew the same value, so nothing is sent): the
    flattened parameter split in equal pieces over its group, the last one zero-padded (DeepSpeed's layout).
    A parameter small enough to stay whole on every rank (ds_persist) gets the whole value too."""
    import torch.distributed as dist

    part = param.ds_tensor
    n = part.numel()
    flat = full.reshape(-1).to(part.device, part.dtype)
    piece = flat[n * dist.get_rank(param.ds_process_group):][:n]
    part.data.zero_()
    part.data[:piece.numel()].copy_(piece)
    if getattr(param, "ds_persist", False) and param.data.numel() == full.numel():  # (not yet gathered: empty)
        param.data.copy_(full.to(param.device, param.dtype).reshape(param.shape))


def initialize(model, optimizer, cfg, plan, precision: str):
    """deepspeed.initialize over the plan's dp x cp group; returns the engine (its checkpoints read weights-only)."""
    import deepspeed

    _init_comm()
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(cfg, plan.dims, precision),
                                           mpu=_MPU(plan.mesh), dist_init_required=False)
    engine.checkpoint_engine = _weights_only_engine(engine.checkpoint_engine)
    return engine


# The non-tensor types DeepSpeed pickles into its ZeRO optimizer files (fp32 and bf16, stages 1-3): plain
# records, allowlisted so that loading needs no arbitrary unpickling.
_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                 "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                 "deepspeed.runtime.zero.config.ZeroStageEnum",
                 "deepspeed.utils.tensor_fragment.fragment_address")


def _weights_only_engine(current):
    """DeepSpeed's torch checkpoint engine, except that it loads with torch.load(weights_only=True) (DeepSpeed's
    own passes weights_only=False, which would run any code a tampered checkpoint carries)."""
    import importlib

    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if type(current) is not TorchCheckpointEngine:  # only by DeepSpeed's own choice (`checkpoint` is OWNED)
        return current
    allowed = []
    for name in _SAFE_GLOBALS:
        module, _, attr = name.rpartition(".")
        try:
            allowed.append(getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError):  # another DeepSpeed version: torch names what is missing
            pass

    class WeightsOnly(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            try:
                with torch.serialization.safe_globals(allowed):
                    return torch.load(path, map_location=map_location, weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises UnpicklingError (or RuntimeError) here
                if "Weights only load failed" not in str(e):
                    raise
                found = re.search(r"GLOBAL ([\w.]+)", str(e))
                raise ValueError(f"{path}: refused to unpickle {found.group(1) if found else 'a non-tensor object'}; "
                                 "longctx loads checkpoints weights-only (a newer DeepSpeed may pickle a type "
                                 "not in deepspeed_engine._SAFE_GLOBALS: add it there if it is plain data)") from None

    engine = WeightsOnly.__new__(WeightsOnly)
    engine.__dict__.update(current.__dict__)  # same settings (serialization format), no second log line
    return engine


TAG = "deepspeed"  # the sub-directory of a longctx checkpoint that holds DeepSpeed's files


def save(engine, directory: str) -> None:
    """DeepSpeed's own checkpoint of the engine (module, ZeRO-partitioned optimizer) under directory/TAG
    (collective: every rank writes its partition)."""
    engine.save_checkpoint(directory, tag=TAG, client_state={}, save_latest=False)


def load(engine, directory: str) -> None:
    """Load directory/TAG into the engine: module, optimizer partitions (the LR schedule is longctx's)."""
    path, _ = engine.load_checkpoint(directory, tag=TAG, load_optimizer_states=True,
                                     load_lr_scheduler_states=False)
    if path is None:
        raise ValueError(f"{directory}/{TAG} holds no DeepSpeed checkpoint")


def full_state_dict(engine, rank0_only: bool = False) -> dict:
    """Every parameter in fp32, unsharded, on every rank (or on rank 0 only: the others return {}). ZeRO-3 gathers one
    parameter at a time, so no rank ever holds more than one full parameter beyond its shard, and with
    rank0_only only rank 0 keeps a host copy (a checkpoint's model.pt, not a full model per rank)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param

    keep = not rank0_only or dist.get_rank() == 0
    out, seen = {}, {}
    # every name of a tied parameter (an HF model's output head is its embedding), as the torch engines'
    # state dicts have it; gathered once
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            if keep:
                out[name] = out[seen[id(param)]]
            continue
        seen[id(param)] = name
        # the optimizer's fp32 master copy where DeepSpeed keeps one (bf16 training casts the module itself)
        master = safe_get_full_fp32_param(param)  # collective under ZeRO-3, like the gather below
        if master is not None:
            if keep:
                out[name] = master.detach().cpu().clone()
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if keep:
                out[name] = param.detach().cpu().clone()
    return out


ADAM_STATES = ("exp_avg", "exp_avg_sq")


def full_optimizer_state(engine, rank0_only: bool = True) -> tuple[dict, int]:
    """({parameter name: {exp_avg, exp_avg_sq}} unsharded, the optimizer's step count) (collective: each
    state is summed over the data-parallel ranks from their disjoint pieces, one parameter at a time, and
    kept on rank 0 only with rank0_only). With full_state_dict's master weights it is everything a run
    needs to go on under another ZeRO stage or data-parallel size."""
    import torch
    import torch.distributed as dist

    opt = engine.optimizer
    inner = opt.optimizer
    keep = not rank0_only or dist.get_rank() == 0
    pieces: dict[int, list] = {}
    for param, flat, offset, count, start in _fragments(opt):
        pieces.setdefault(id(param), []).append((flat, offset, count, start))
    out = {}
    for name, param in engine.module.named_parameters():
        numel = getattr(param, "ds_numel", param.numel())
        full = torch.zeros(len(ADAM_STATES), numel, dtype=torch.float32, device=param.device)
        for flat, offset, count, start in pieces.get(id(param), []):
            if not inner.state.get(flat):  # no update applied yet (a skipped non-finite first step): zeros
                continue
            n = min(count, numel - start)  # a ZeRO-3 partition's padding is no parameter's
            for row, key in enumerate(ADAM_STATES):
                full[row, start:start + n] = inner.state[flat][key].narrow(0, offset, n)
        dist.all_reduce(full, group=opt.dp_process_group)
        if keep:
            shape = tuple(getattr(param, "ds_shape", param.shape))
            out[name] = {key: full[row].reshape(shape).cpu().clone() for row, key in enumerate(ADAM_STATES)}
    steps = {float(s["step"]) for s in inner.state.values() if "step" in s} or {0.0}
    if len(steps) != 1:
        raise RuntimeError(f"DeepSpeed's optimizer partitions disagree on the step count: {sorted(steps)}")
    return out, int(steps.pop())


def _fragments(opt):
    """(parameter, its flat fp32 partition, offset there, element count, where the piece begins in the
    flattened full parameter) for every piece of a parameter this rank's optimizer holds."""
    import torch.distributed as dist

    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3: rank r holds [size * r, + size) of each parameter
        for group in opt.fp16_groups:
            for param in group:
                sub, offset, count = opt.grad_position[opt.get_param_id(param)]
                start = param.ds_tensor.numel() * dist.get_rank(param.ds_process_group)
                yield param, opt.fp32_partitioned_groups_flat[sub], offset, count, start
        return
    for flat, group in zip(opt.single_partition_of_fp32_groups, opt.bit16_groups):  # ZeRO 1-2: mapped ranges
        for param in group:
            mapping = param._hp_mapping
            if mapping is not None:
                hp = mapping.get_hp_fragment_address()
                yield param, flat, hp.start, hp.numel, mapping.lp_fragment_address.start


def load_full_state(engine, weights: dict, states: dict, step: int) -> None:
    """Put full (unsharded) master weights and Adam states, as full_state_dict and full_optimizer_state gave
    them under any ZeRO stage and data-parallel size, into this engine's pieces: the module's parameters
    (low precision under bf16), the fp32 master partitions and the optimizer state of each (created here:
    a fresh engine has none before its first step). Every rank reads the full values; nothing is sent."""
    import torch

    opt = engine.optimizer
    inner = opt.optimizer
    stage3 = hasattr(opt, "fp32_partitioned_groups_flat")
    for flat in opt.fp32_partitioned_groups_flat if stage3 else opt.single_partition_of_fp32_groups:
        inner.state[flat] = {"step": torch.tensor(float(step)), **{key: torch.zeros_like(flat) for key in ADAM_STATES}}
    names = {id(p): n for n, p in engine.module.named_parameters()}
    for param in engine.module.parameters():
        full = weights[names[id(param)]]
        if stage3:
            _write_partition(param, full)
        else:
            param.data.copy_(full.to(param.device, param.dtype))
    for param, flat, offset, count, start in _fragments(opt):
        name = names[id(param)]
        for target, full in ((flat, weights[name]),
                             *((inner.state[flat][key], states[name][key]) for key in ADAM_STATES)):
            piece = full.reshape(-1)[start:start + count]
            target = target.data.narrow(0, offset, count)
            target.zero_()
            target[:piece.numel()].copy_(piece.to(target.device, target.dtype))

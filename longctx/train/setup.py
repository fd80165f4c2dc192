"""Everything a job config must satisfy, checked once before any rank builds anything.

Each message names the key and what to change. The world size is the only fact from outside the config.
"""

from __future__ import annotations

import math
import os
import time

from .._paths import check_output
from ..config import ConfigError, ParallelConfig, validate_model
from ..model.parallelize import AC_MODES, dilated_layout_problem
from ..parallel.data_parallel import resolve_engine
from ..parallel.dims import ParallelDims
from ..parallel.pipeline import stages_per_rank
from .inapplicable import check_inapplicable
from .optim import LR_SCHEDULES

PRECISIONS = ("auto", "fp32", "bf16")


def _positive(section: str, cfg, *keys, allow_zero: bool = False) -> None:
    for key in keys:
        value = cfg[key]
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            finite = "" if math.isfinite(value) else "a finite number "
            raise ConfigError(f"{section}.{key} must be {finite}{'>= 0' if allow_zero else '> 0'}, got {value}")


def _below(section: str, cfg, key: str, limit: float, inclusive: bool = False) -> None:
    value = cfg[key]
    if value > limit or (value == limit and not inclusive):
        raise ConfigError(f"{section}.{key} must be {'<=' if inclusive else '<'} {limit}, got {value}")


def _check_int64(node, prefix: str = "") -> None:
    """Every integer of the config fits torch's int64 (a larger one fails deep inside a rank)."""
    for key, value in node.items():
        name = f"{prefix}{key}"
        if hasattr(value, "items"):
            _check_int64(value, name + ".")
        elif isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
            raise ConfigError(f"{name}={value} does not fit a 64-bit integer; give a value below 2**63")


def _check_numbers(cfg) -> None:
    """Ranges of the optimizer and timeout settings (what torch would only refuse inside a rank)."""
    import datetime

    _check_int64(cfg)
    p, t = cfg.parallel, cfg.train
    _positive("parallel", p, "ac_every", "timeout_s")
    if p.timeout_s < 1:  # ranks could not even connect: gloo's full mesh would time out in every rank
        raise ConfigError(f"parallel.timeout_s={p.timeout_s} s is too short for the ranks to connect; give at least "
                          "1 (seconds a collective may wait; default 600)")
    try:
        datetime.timedelta(seconds=p.timeout_s)
        if p.timeout_s * 1e6 >= 2**63:  # gloo keeps it in int64 microseconds: above that it fails inside a rank
            raise OverflowError
    except OverflowError:
        raise ConfigError(f"parallel.timeout_s={p.timeout_s} is too large for a timeout; use seconds, e.g. "
                          "parallel.timeout_s=1800") from None
    _positive("train", t, "steps", "batch_size", "seq_len", "accumulation", "lr", "mlp_chunks", "eps")
    _positive("train", t, "beta1", "beta2", "warmup_steps", "weight_decay", "grad_clip", "loss_chunk",
              "min_lr_ratio", "seed", "skip_nonfinite", "decay_steps", allow_zero=True)
    _below("train", t, "beta1", 1.0)
    _below("train", t, "beta2", 1.0)
    _below("train", t, "min_lr_ratio", 1.0, inclusive=True)  # the cosine decays to lr x this: above 1 it rises
    import torch

    fp32 = torch.finfo(torch.float32)  # AdamW's states and steps are float32 (a Python float only on the way in)
    if t.lr > fp32.max:
        raise ConfigError(f"train.lr={t.lr} does not fit a float32 (the optimizer's lr); give a learning rate such as "
                          "3e-4")
    if t.eps < fp32.tiny:
        raise ConfigError(f"train.eps={t.eps} is 0 in float32, so a weight whose gradient is 0 gets 0/0; give at least "
                          f"{fp32.tiny:.2g} (1e-8 usually)")
    if t.lr * t.weight_decay >= 1:
        raise ConfigError(f"train.lr x train.weight_decay = {t.lr * t.weight_decay:g}: AdamW multiplies each decayed "
                          "weight by 1 - lr x weight_decay every step, which at 1 or more zeroes or flips it; lower "
                          "train.lr or train.weight_decay (0.1 usually)")
    _positive("validation", cfg.validation, "interval", "holdout", allow_zero=True)
    _positive("validation", cfg.validation, "batches")


def dims_from_config(cfg, world_size: int) -> ParallelDims:
    p = cfg.parallel
    try:
        return ParallelDims(dp_replicate=p.dp_replicate, dp_shard=p.dp_shard, cp=p.cp, tp=p.tp, pp=p.pp,
                            world_size=world_size, strategy=p.strategy, ulysses=p.ulysses, layout=p.layout)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def validate_job(cfg, world_size: int) -> ParallelDims:
    """All checks of a job config for `world_size` ranks; returns the validated ParallelDims."""
    from ..kernels import check_name

    if cfg.model.hf_path == "":
        raise ConfigError("model.hf_path is empty: give a Hugging Face model directory, or null for longctx's own "
                          "Llama")
    if cfg.model.hf_path:
        _adopt_hf_sizes(cfg)
    try:
        validate_model(cfg.model)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dims = dims_from_config(cfg, world_size)
    p, t = cfg.parallel, cfg.train
    try:
        check_name(p.kernel, "parallel.kernel=")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    try:
        engine = resolve_engine(p.engine, dims)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if p.meta_init and engine == "ddp":
        raise ConfigError("parallel.meta_init=true builds the model on the meta device and initialises only this "
                          "rank's pieces, but engine=ddp broadcasts every rank's full weights when it wraps the "
                          "model; use parallel.engine=fsdp (FSDP2, or HSDP with dp_replicate > 1) or meta_init=false")
    if p.activation_checkpoint not in AC_MODES:
        raise ConfigError(f"parallel.activation_checkpoint={p.activation_checkpoint!r}: choose one of "
                          f"{', '.join(AC_MODES)}")
    if t.precision not in PRECISIONS:
        raise ConfigError(f"train.precision={t.precision!r}: choose one of {', '.join(PRECISIONS)}")
    if t.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule={t.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}")
    _check_numbers(cfg)
    if t.decay_steps and t.steps <= t.warmup_steps:
        raise ConfigError(f"train.decay_steps={t.decay_steps}: no step is left after the warmup (train.steps="
                          f"{t.steps}, train.warmup_steps={t.warmup_steps}); set train.decay_steps=0, or more "
                          "train.steps")
    longest = t.steps - max(t.warmup_steps, 1)  # some step must reach the peak: the warmup's last, or the first
    if t.decay_steps and t.decay_steps > longest:
        after = (f"the {longest} steps after the warmup (train.steps={t.steps} - train.warmup_steps={t.warmup_steps})"
                 if t.warmup_steps else f"the {longest} steps after the first, which is the peak (train.steps="
                 f"{t.steps}, no warmup)")
        raise ConfigError(f"train.decay_steps={t.decay_steps} is more than {after}; use at most {max(0, longest)} "
                          "(the decay then leaves the peak at once), or 0 for the default (one step at the peak after "
                          "the warmup, then the decay)")
    try:  # the schedule's name even when pp=1, as pp_split/microbatches/pp_virtual are
        stages_per_rank(p.pp_schedule, 0)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    per = dims.dp * t.accumulation
    if t.batch_size % per:
        lo, hi = t.batch_size - t.batch_size % per, t.batch_size + per - t.batch_size % per
        raise ConfigError(
            f"train.batch_size={t.batch_size} sequences cannot be split over {dims.dp} data-parallel ranks x "
            f"{t.accumulation} accumulation steps (needs a multiple of {per}); use train.batch_size="
            f"{hi}{f' or {lo}' if lo else ''}, or change parallel.dp_* / train.accumulation")
    try:
        dims.check_seq_len(t.seq_len)
        dims.check_heads(cfg.model.n_heads, cfg.model.n_kv_heads)
        _check_model_axes(cfg, dims, engine)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.model.dilated.layers:
        _check_dilated(cfg, dims)
    c = cfg.checkpoint
    _positive("checkpoint", c, "interval", "keep_last", allow_zero=True)
    if t.resume == "auto" and cfg.run_dir is None and c.dir is None:
        # (launch local and ray name the run directory once, after this check: their restarts share it)
        raise ConfigError("train.resume=auto continues the run whose checkpoints are under run_dir, but run_dir is "
                          "not set: every launch names a new runs/NAME-TIMESTAMP, where there is no checkpoint to "
                          "continue (a restarted job would start afresh); set run_dir=DIR, the same on every launch "
                          "and on storage every node sees, or checkpoint.dir=DIR")
    if t.init_from is not None and t.resume not in ("auto", "none"):
        # (with resume=auto, init_from starts the run when there is nothing yet to resume: both apply in turn)
        raise ConfigError(f"train.init_from={t.init_from!r} has no effect with train.resume={t.resume!r}: the "
                          "resumed checkpoint brings its own weights; drop one of them (train.resume=auto starts from "
                          "init_from only when the run has no checkpoint yet)")
    if t.resume not in ("auto", "none"):  # found before any rank starts, not by rank 0 after
        from .checkpoint_dirs import locate

        if not os.path.exists(t.resume):
            raise ConfigError(f"train.resume={t.resume!r} does not exist; give a checkpoint directory (step_...), a "
                              "checkpoint root, train.resume=auto or none")
        try:
            locate(t.resume, f"train.resume={t.resume!r}", log=lambda *a, **k: None)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if t.init_from is not None and not os.path.exists(t.init_from):
        raise ConfigError(f"train.init_from={t.init_from!r} does not exist; give a checkpoint directory (step_...) or "
                          "a checkpoint root whose model weights start this run")
    if engine == "deepspeed" and c.async_save:
        raise ConfigError("checkpoint.async_save=true is a DCP feature; with parallel.engine=deepspeed checkpoints "
                          "are DeepSpeed's own and written synchronously: set checkpoint.async_save=false")
    for key, path in (("run_dir", cfg.run_dir), ("checkpoint.dir", c.dir)):
        try:
            check_output(path, key, "dir")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    check_inapplicable(cfg)
    _check_data(cfg)
    _check_validation(cfg)
    return dims


def _adopt_hf_sizes(cfg) -> None:
    """model.hf_path: the model's sizes come from its config.json (the model section's are replaced), and what
    only longctx's own Llama supports is refused."""
    from ..model.hf import model_config
    from ..model.hf_checks import check_hf_config, check_hf_model, check_pipeline_split, decoder_class, read_hf_config
    from ..model.hf_load import build_hf_on_meta, check_tied_files
    from ..model.hf_tensor import check_hf_tp

    m, p = cfg.model, cfg.parallel
    if m.window is not None or m.dilated.layers:
        raise ConfigError("model.hf_path takes the architecture from the checkpoint: drop model.window and "
                          "model.dilated.layers (sliding windows come from its config)")
    if cfg.train.mlp_chunks > 1:
        raise ConfigError("train.mlp_chunks applies to longctx's own Llama; set it to 1 with model.hf_path")
    if p.meta_init and p.engine == "deepspeed":
        raise ConfigError("parallel.meta_init=true with model.hf_path and parallel.engine=deepspeed is not built (the "
                          "HF model would still be read whole on every rank before ZeRO-3 partitions it); use "
                          "meta_init=false, or the fsdp engine for a model read in pieces")
    try:
        hf_config = read_hf_config(m.hf_path)
        check_hf_config(hf_config)
        hf = model_config(hf_config)
        if p.pp > 1:
            check_pipeline_split(decoder_class(hf_config))
        _check_softcap_kernel(hf_config, p.kernel)
        # what only the built model shows (its attention's routing, its head), on the meta device: no weights
        built = build_hf_on_meta(m.hf_path)
        check_hf_model(built)
        check_tied_files(built, m.hf_path)
        # a self-rescaling RoPE (dynamic, longrope) needs no check: the trainer pins it to train.seq_len
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_no_own_settings(m, hf)
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "rope_theta",
                "norm_eps"):
        setattr(m, key, getattr(hf, key))
    try:
        check_hf_tp(hf, p.tp)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_no_own_settings(model, hf) -> None:
    """model.rope_theta / norm_eps set beside model.hf_path: the Hugging Face model computes with its config.json's,
    so another value would be ignored without a word (the sizes, which its weights fix, are simply taken)."""
    from ..config import ModelConfig

    defaults = ModelConfig()
    for key, where in (("rope_theta", "rope_theta"), ("norm_eps", "rms_norm_eps")):
        given, theirs = getattr(model, key), getattr(hf, key)
        if given != getattr(defaults, key) and not math.isclose(given, theirs, rel_tol=1e-9):
            raise ConfigError(f"model.{key}={given} with model.hf_path: a Hugging Face model computes with the "
                              f"{where} of its config.json ({theirs:g}); set it there (in a copy of the directory), "
                              f"or drop model.{key}")


def _check_softcap_kernel(hf_config, kernel: str) -> None:
    """A model whose attention scores are soft-capped (Gemma 2) with a kernel named that cannot cap them would
    fail at its first attention call on every rank: say so now (auto picks one that can)."""
    from ..kernels import backends

    cap = getattr(hf_config, "attn_logit_softcapping", None)
    backend = backends().get(kernel)
    if cap and backend is not None and not backend.softcap:
        capable = sorted(name for name, b in backends().items() if b.softcap)
        raise ValueError(f"parallel.kernel={kernel} does not compute logit soft-capping, which this model's "
                         f"attention asks for (attn_logit_softcapping={cap}); use parallel.kernel=auto or one of "
                         f"{', '.join(capable)}")


def _check_data(cfg) -> None:
    from ..data import build_source
    from ..data.sources import packs_documents
    from ..data.synthetic import TASKS
    from ..data.tokens import read_meta

    d = cfg.data
    if isinstance(d.workers, bool) or not isinstance(d.workers, int) or d.workers < 0:
        raise ConfigError(f"data.workers={d.workers!r} must be an int >= 0 (0: batches are made inline)")
    if d.source == "synthetic" and d.task not in TASKS:
        raise ConfigError(f"data.task={d.task!r}: choose one of {', '.join(TASKS)}")
    if d.source == "synthetic" and not 2 <= d.alphabet <= cfg.model.vocab_size:
        raise ConfigError(f"data.alphabet={d.alphabet} must be between 2 and model.vocab_size={cfg.model.vocab_size}")
    if packs_documents(d) and cfg.model.dilated.layers:
        what = f"data.source={d.source}" + (f" with data.pack_min={d.pack_min}" if d.source != "tokens" else "")
        raise ConfigError(f"{what} packs documents, and LongNet dilated layers do not take document boundaries yet; "
                          "drop model.dilated.layers, or use unpacked data (data.pack_min=0, or a synthetic task)")
    try:
        if d.source == "tokens" and cfg.model.hf_path and d.path:
            _check_tokenizer(read_meta(d.path), cfg.model.hf_path, d.path)
        build_source(d, seq_len=cfg.train.seq_len, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed,
                     holdout=cfg.validation.holdout)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def _check_validation(cfg) -> None:
    from ..data.sources import build_validation_source
    from ..data.tokens import read_meta

    v = cfg.validation
    if not v.interval:
        return
    try:
        if cfg.data.source == "tokens" and cfg.model.hf_path and v.path:
            _check_tokenizer(read_meta(v.path, "validation.path"), cfg.model.hf_path, v.path, "validation.path")
        build_validation_source(cfg.data, v, seq_len=cfg.train.seq_len, vocab_size=cfg.model.vocab_size,
                                seed=cfg.train.seed, batch_size=cfg.train.batch_size)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e)) from None


def _check_tokenizer(meta: dict, hf_path: str, data_path: str, what: str = "data.path") -> None:
    """A Hugging Face model's data must come from its own tokenizer.json, when the checkpoint has one."""
    from ..data.tokenizer import file_sha256

    tok = os.path.join(hf_path, "tokenizer.json")
    if os.path.exists(tok) and meta.get("tokenizer_sha256") != file_sha256(tok):
        raise ConfigError(f"{what}={data_path!r} was tokenized with {meta.get('tokenizer')!r}, not with "
                          f"model.hf_path's tokenizer.json; prepare it with: longctx data prepare --tokenizer "
                          f"{hf_path} --input ... --output ...")


def _check_model_axes(cfg, dims: ParallelDims, engine: str) -> None:
    """Tensor, pipeline and DeepSpeed constraints (ValueError naming the key)."""
    from ..parallel.deepspeed_engine import check_deepspeed
    from ..parallel.pipeline import check_pipeline
    from ..parallel.tensor import check_tp

    p, t, m = cfg.parallel, cfg.train, cfg.model
    check_tp(m.n_heads, m.n_kv_heads, m.vocab_size, dims.tp, m.ffn_dim)
    if dims.tp > 1 and (t.seq_len // dims.cp) % dims.tp:
        raise ValueError(f"train.seq_len={t.seq_len} over parallel.cp={dims.cp} gives {t.seq_len // dims.cp} tokens "
                         f"per context rank, not divisible by parallel.tp={dims.tp} (sequence parallelism shards "
                         f"them over tp); use a seq_len that is a multiple of {dims.cp * dims.tp}")
    if dims.tp > 1 and t.mlp_chunks > 1:
        raise ValueError(f"train.mlp_chunks={t.mlp_chunks} with parallel.tp={dims.tp} is not supported (each chunk's "
                         "w2 reduce-scatter would interleave the sequence shards); set train.mlp_chunks=1")
    if dims.tp > 1 and m.dilated.layers:
        raise ValueError(f"model.dilated.layers with parallel.tp={dims.tp} is not supported (LongNet's per-head row "
                         "offsets are global head indices); set parallel.tp=1 or drop the dilated layers")
    for key in ("pp_virtual", "microbatches"):
        if p[key] < 0:
            raise ValueError(f"parallel.{key}={p[key]} must be >= 0 (0 = the default)")
    if dims.pp > 1:
        check_pipeline(pp=dims.pp, schedule=p.pp_schedule, virtual=p.pp_virtual, microbatches=p.microbatches,
                       n_layers=m.n_layers, local_batch=t.batch_size // (dims.dp * t.accumulation), split=p.pp_split,
                       sharded=engine in ("fsdp", "hsdp"), reshard_after_forward=p.reshard_after_forward,
                       activation_checkpoint=p.activation_checkpoint)
        if m.dilated.layers:
            raise ValueError("model.dilated.layers with parallel.pp > 1 is not supported; use parallel.pp=1")
    else:
        given = [f"parallel.{k}" for k in ("pp_split", "microbatches", "pp_virtual") if p[k]]
        if p.pp_schedule != ParallelConfig().pp_schedule:  # a string: given when it is not the default
            given.insert(0, "parallel.pp_schedule")
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(f"{', '.join(given)} {verb} only to a pipeline (parallel.pp > 1); remove "
                             f"{'it' if len(given) == 1 else 'them'} or set parallel.pp")
    if engine == "deepspeed":
        check_deepspeed(dims, p)
    elif p.deepspeed_config is not None or p.zero_stage != 1:
        raise ValueError("parallel.zero_stage / parallel.deepspeed_config apply only to parallel.engine=deepspeed; "
                         "set the engine or remove them")


def _check_dilated(cfg, dims: ParallelDims) -> None:
    from ..model.llama import dilated_pattern
    from ..parallel.sequence.dilated import check_pattern

    problem = dilated_layout_problem(dims)
    if problem:
        raise ConfigError(f"model.dilated.layers {problem}")
    d, seq_len = cfg.model.dilated, cfg.train.seq_len
    try:
        ws, rs = dilated_pattern(cfg.model, seq_len)
        check_pattern(ws, rs, seq_len, dims.cp)
    except ValueError as e:
        if d.segment_lengths or not (_positive_int(d.w0) and _positive_int(d.alpha) and d.alpha > 1):
            raise ConfigError(f"model.dilated: {e}") from None  # a w0 or alpha of its own to fix first
        fits = d.w0 * d.alpha ** max(0, math.ceil(math.log(max(seq_len / d.w0, 1), d.alpha))) if d.alpha > 1 else d.w0
        raise ConfigError(f"model.dilated: the pattern derived from w0={d.w0}, alpha={d.alpha} and train.seq_len="
                          f"{seq_len} does not hold ({e}); set train.seq_len to w0 x alpha^k (e.g. {fits}), another "
                          "model.dilated.w0, or segment_lengths and dilation_rates of your own") from None


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def resolve_precision(precision: str, device_type: str) -> str:
    """auto: bf16 autocast on GPU, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if device_type == "cuda" else "fp32"
    return precision


def default_run_dir(config_path: str | None) -> str:
    """runs/<config name>-<date>-<time>, made here so that it is this run's alone: two runs started in the same
    second (a sweep) wrote one metrics file and config.yaml; the second takes `...-2`. Call it in one process."""
    name = os.path.splitext(os.path.basename(config_path))[0] if config_path else "run"
    base = os.path.join("runs", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs("runs", exist_ok=True)
    for n in range(1, 10_000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise ValueError(f"{base}-* are all taken; give the run a run_dir")

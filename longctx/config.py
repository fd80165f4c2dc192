"""Structured configs (OmegaConf): typed defaults, YAML files, dotted `key=value` overrides.

One section per concern: `model` (architecture only), `parallel` (how the job is split over ranks), `train`
(the optimisation), `data`, `validation`, `checkpoint`, `logging`, and `run_dir`. Loading checks what a
schema can: unknown keys (with a did-you-mean), types, and a missing file; the choices that depend on
registries (strategies, kernels) and on the world size are checked by longctx.train.setup.validate_job; the
checks of keys and values before OmegaConf types them are in longctx.config_checks. The two import nothing
else of longctx (they sit at the bottom of the import graph), and never evaluate code: only OmegaConf's
plain interpolation is available, no custom resolvers.
"""

from __future__ import annotations

import copy
import functools
import math
import os
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config_checks import (
    ConfigError,
    check_file_scalars,
    check_interpolations,
    check_keys,
    check_plain_scalar,
    leaf_type,
    schema_keys,
)


@dataclass
class DilatedConfig:
    """LongNet dilated attention on some layers (a model choice; it distributes itself over the cp ranks)."""

    layers: list[int] = field(default_factory=list)  # which layers are dilated; empty: none
    segment_lengths: list[int] = field(default_factory=list)  # empty: derived from w0/alpha and the seq len
    dilation_rates: list[int] = field(default_factory=list)
    w0: int = 64
    alpha: int = 2


@dataclass
class RopeScalingConfig:
    """How RoPE stretches past the length the model was trained at (longctx/model/rope.py)."""

    type: str = "none"  # none | linear | llama3 | yarn
    factor: float = 1.0  # how many times longer (linear, llama3, yarn)
    original_max_positions: int = 0  # the length trained at (llama3, yarn)
    low_freq_factor: float = 1.0  # llama3: waves longer than original / this are interpolated
    high_freq_factor: float = 4.0  # llama3: waves shorter than original / this are kept
    beta_fast: float = 32.0  # yarn: pairs turning more often than this over the original length are kept
    beta_slow: float = 1.0  # yarn: pairs turning less often than this are interpolated


@dataclass
class ModelConfig:
    vocab_size: int = 256  # the byte-level tokenizer needs no download
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # width of each attention head; None: dim / n_heads (Qwen3, Gemma decouple them)
    ffn_dim: int = 352
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig = field(default_factory=RopeScalingConfig)
    norm_eps: float = 1e-5
    window: int | None = None  # sliding-window attention: keys each query sees (None: full causal)
    dilated: DilatedConfig = field(default_factory=DilatedConfig)
    hf_path: str | None = None  # a local Hugging Face checkpoint directory: train it as it is (sizes read from it)


@dataclass
class ParallelConfig:
    # degrees (ParallelDims); -1 = the rest of the world, at most one
    dp_replicate: int = 1
    dp_shard: int = -1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    strategy: str = "zigzag"  # ring | zigzag | striped | allgather | ulysses | hybrid
    ulysses: int = 1  # hybrid: the Ulysses factor of cp (cp = ring x ulysses)
    layout: str | None = None  # token layout for strategies that accept several; None: the strategy's
    kernel: str = "auto"  # local attention kernel backend
    balance_documents: bool = False  # packed data: reorder each sequence's documents to even out the cp ranks' work
    engine: str = "auto"  # auto = torch (FSDP2 for dp_shard, DDP for dp_replicate) | fsdp | ddp | deepspeed
    zero_stage: int = 1  # engine=deepspeed: ZeRO stage 1, 2 or 3
    deepspeed_config: str | None = None  # engine=deepspeed: a JSON file of keys added to the generated config
    pp_schedule: str = "1f1b"  # gpipe | 1f1b | interleaved_1f1b | looped_bfs | interleaved_zb | zbv | dualpipev
    pp_virtual: int = 0  # pipeline stages per rank: 0 = the schedule's default (1, or 2 for interleaved/V)
    microbatches: int = 0  # pipeline microbatches per data-parallel batch: 0 = parallel.pp
    pp_split: list[int] = field(default_factory=list)  # first layer of stages 1..; empty = even split
    reshard_after_forward: bool = True  # FSDP2: free gathered parameters after forward (more comm, less memory)
    activation_checkpoint: str = "none"  # none | full | selective (every `ac_every`-th layer)
    ac_every: int = 2
    timeout_s: float = 600.0  # process-group timeout: a collective some rank never joins fails after this
    meta_init: bool = False  # build on the meta device, split, then initialise only this rank's pieces


@dataclass
class TrainConfig:
    steps: int = 20
    batch_size: int = 4  # global sequences per optimizer step, split over data-parallel ranks
    seq_len: int = 1024
    accumulation: int = 1  # micro-batches per optimizer step on each data-parallel rank
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the decay ends at lr * min_lr_ratio
    warmup_steps: int = 2
    lr_schedule: str = "cosine"  # after the warmup: cosine | linear decay to the floor | constant at the peak
    decay_steps: int = 0  # the decay spans the last this many steps (warmup-stable-decay); 0: every step after warmup
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    seed: int = 0
    loss_chunk: int = 1024  # tokens per chunk of output layer + cross-entropy; 0: all logits at once
    mlp_chunks: int = 1  # >1: the MLP runs over this many sequence chunks, each recomputed in backward
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | fp32 | bf16
    resume: str = "none"  # auto (the newest complete checkpoint in checkpoint.dir, if any) | none | a path
    init_from: str | None = None  # a checkpoint (or root) or HF Llama dir whose weights start a fresh run
    skip_nonfinite: int = 0  # steps in a row whose gradient norm is NaN/inf skipped (update withheld); one more stops


@dataclass
class CheckpointConfig:
    interval: int = 0  # save every this many optimizer steps, and at the end of the run; 0 = off
    keep_last: int = 3  # complete checkpoints kept (0: all); older ones are deleted after a new one is complete
    dir: str | None = None  # default: run_dir/checkpoints
    async_save: bool = False  # write in the background (DCP async_save); completed before the next save / at the end
    on_signal: bool = True  # SIGTERM / SIGUSR1: finish the step, save a checkpoint, stop (exit 128 + signal)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | tokens | passkey | needle | recall
    path: str | None = None  # tokens: a directory made by `longctx data prepare`
    shuffle: bool = True  # tokens: each epoch reads the packed windows in a seeded permutation
    workers: int = 0  # DataLoader worker processes per rank preparing the next steps' batches (0: inline)
    task: str = "induction"  # synthetic: induction | copy | random
    alphabet: int = 16  # synthetic and retrieval tasks draw from this many token ids
    period: int = 32  # induction: length of the repeated pattern
    mask_prompt: bool = True  # copy: labels of the prompt half are ignored (prompt-masked SFT)
    digits: int = 4  # retrieval: digits of each value (the answer)
    depth: float | None = None  # needle: fraction of the haystack before the needle (null: random)
    pairs: int = 4  # recall: key-value facts in each sequence
    pack_min: int = 0  # retrieval: >0 packs examples of random lengths in [pack_min, seq_len] as documents
    haystack: str = "random"  # retrieval filler: random | repeat (a random 16-64 token pattern, repeated)


@dataclass
class ValidationConfig:
    interval: int = 0  # held-out loss every this many optimizer steps and at the end of the run; 0 = off
    batches: int = 4  # validation batches of train.batch_size sequences (the same ones every time)
    path: str | None = None  # data.source=tokens: held-out documents, a directory made by `longctx data prepare`
    holdout: int = 0  # data.source=tokens: or the last this many windows of data.path (training skips them)


@dataclass
class LoggingConfig:
    quiet: bool = False  # no progress bar, no config print (CI)
    tensorboard: bool = True  # events into run_dir (needs the tensorboard package)
    print_config: bool = True


@dataclass
class JobConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    run_dir: str | None = None  # None: runs/<config name>-<time>


# ------------------------------------------------------------------------------------------------ loading
def _parse_overrides(overrides, schema: dict) -> DictConfig:
    """The overrides as a config. A value for a text key is the text as typed (YAML would make 007 the number 7
    and `no` false before OmegaConf turned them back into '7' and 'False'); null, ~ and quoted text stay YAML."""
    import yaml  # omegaconf parses each value as YAML

    for o in overrides:
        if "=" not in o or o.startswith("="):
            raise ConfigError(f"override {o!r} is not key=value (e.g. train.steps=10)")
    out = OmegaConf.create()
    for o in overrides:  # in order: the last of a key's overrides wins
        key, _, value = o.partition("=")
        kind = leaf_type(schema, key)
        try:
            if kind in ("str", "str | None") and value not in ("null", "~") and \
                    not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
                OmegaConf.update(out, key, value, force_add=True)
                continue
            one = OmegaConf.from_dotlist([o])
            out = OmegaConf.merge(out, one)
        except (OmegaConfBaseException, yaml.YAMLError) as e:
            raise ConfigError(f"could not parse override {o!r}: {str(e).splitlines()[0]}") from None
        if kind is not None and "${" not in value:  # an interpolation is resolved, and typed, with the whole config
            typed = OmegaConf.select(one, key)
            typed = OmegaConf.to_container(typed) if OmegaConf.is_config(typed) else typed
            check_plain_scalar(yaml.compose(value, Loader=yaml.SafeLoader), typed, kind, key, "overrides")
    return out


def _merge(cfg, other, source: str):
    try:
        return OmegaConf.merge(cfg, other)
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        first = str(e).splitlines()[0]
        if "is not a ListConfig" in first:  # OmegaConf's words for a scalar given to a list key
            first = f"must be a list, e.g. {key}=[2,4] (brackets, no spaces), got {getattr(e, 'value', None)!r}"
        elif first.startswith("Incompatible value 'None'"):  # null for a key that needs a value
            first = "cannot be null: give it a value (`longctx config show CONFIG` prints the defaults)"
        raise ConfigError(f"config key {key!r} (in {source}): {first}") from None


@functools.cache
def _defaults(cls):
    """`cls`'s defaults as a typed DictConfig, built once: OmegaConf.structured walks the dataclasses (half of
    a config's load, and every rank of every launch loads one). Never handed out: merge copies it."""
    return OmegaConf.structured(cls)


def load(cls=JobConfig, path: str | None = None, overrides: list[str] | tuple = ()):
    """Defaults of `cls`, merged with a YAML file and `key=value` overrides; returns a DictConfig that
    rejects unknown keys and wrong types. Errors are ConfigError naming the key."""
    schema = schema_keys(cls)
    cfg = _defaults(cls)
    if path is not None:
        if os.path.isdir(path):
            raise ConfigError(f"config file {path!r} is a directory; pass a YAML file in it (e.g. configs/tiny.yaml)")
        if not os.path.exists(path):
            raise ConfigError(f"config file {path!r} not found; pass a YAML file (e.g. configs/tiny.yaml)")
        if not os.path.isfile(path):
            raise ConfigError(f"config file {path!r} is not a regular file; pass a YAML file (e.g. configs/tiny.yaml)")
        try:
            data = OmegaConf.load(path)
        except Exception as e:  # noqa: BLE001 - any YAML parse failure is a user error in that file
            if "Invalid loaded object type" not in str(e):
                raise ConfigError(f"config file {path!r} is not valid YAML: {str(e).splitlines()[0]}") from None
            data = None
        if not isinstance(data, DictConfig):
            raise ConfigError(f"config file {path!r} must hold a mapping of sections (model:, parallel:, ...)")
        check_keys(OmegaConf.to_container(data), schema, "", path)
        import yaml  # the file's plain scalars as written, which OmegaConf's values no longer show

        with open(path, encoding="utf-8") as f:
            check_file_scalars(yaml.compose(f.read(), Loader=yaml.SafeLoader), OmegaConf.to_container(data),
                                schema, "", path)
        cfg = _merge(cfg, data, path)
    if overrides:
        dot = _parse_overrides(overrides, schema)
        check_keys(OmegaConf.to_container(dot), schema, "", "overrides")
        cfg = _merge(cfg, dot, "overrides")
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"config does not resolve: {str(e).splitlines()[0]}") from None
    check_interpolations(cfg, schema)
    return copy.deepcopy(cfg) if cfg is _defaults(cls) else cfg


def from_dict(data: dict):
    """A resolved config shipped as a plain dict (to harness ranks, Ray workers) back into a typed JobConfig."""
    return OmegaConf.merge(_defaults(JobConfig), OmegaConf.create(data))


def to_yaml(cfg) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


def head_dim_of(model_cfg) -> int:
    """The width of one attention head: model.head_dim, or dim / n_heads when it is not set."""
    return model_cfg.head_dim if model_cfg.head_dim is not None else model_cfg.dim // model_cfg.n_heads


def validate_model(cfg) -> None:
    """Arithmetic constraints of the architecture (what the model alone can check)."""
    for key in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key} must be a positive int, got {getattr(cfg, key)}")
    if not 1 < cfg.rope_theta < math.inf:  # at 1 every frequency is 1 (yarn's log(base) is 0), below it they grow
        raise ConfigError(f"model.rope_theta must be a finite number > 1 (the RoPE base: 10000 for Llama 2, 500000 for "
                          f"Llama 3), got {cfg.rope_theta}")
    if not 0 < cfg.norm_eps < 1:  # added to the activations' mean square: near 1 or above it flattens them
        raise ConfigError(f"model.norm_eps must be a number between 0 and 1 (1e-5 or 1e-6 usually), got {cfg.norm_eps}")
    _validate_rope_scaling(cfg.rope_scaling)
    if cfg.head_dim is None and cfg.dim % cfg.n_heads:
        raise ConfigError(f"model.dim {cfg.dim} must be divisible by model.n_heads {cfg.n_heads} (or set "
                          f"model.head_dim)")
    if cfg.head_dim is not None and cfg.head_dim < 1:
        raise ConfigError(f"model.head_dim must be null (dim / n_heads) or a positive int, got {cfg.head_dim}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ConfigError(
            f"model.n_heads {cfg.n_heads} must be a multiple of model.n_kv_heads {cfg.n_kv_heads} (GQA groups)"
        )
    if head_dim_of(cfg) % 2:
        raise ConfigError(f"head_dim {head_dim_of(cfg)} must be even for RoPE; change model.head_dim, or model.dim "
                          f"or n_heads")
    if cfg.window is not None and cfg.window < 1:
        raise ConfigError(f"model.window must be null or a positive int (keys each query sees), got {cfg.window}")
    bad = [i for i in cfg.dilated.layers if not 0 <= i < cfg.n_layers]
    if bad:
        raise ConfigError(f"model.dilated.layers {list(cfg.dilated.layers)} names layers {bad} outside "
                          f"0..{cfg.n_layers - 1}")
    if len(cfg.dilated.segment_lengths) != len(cfg.dilated.dilation_rates):
        raise ConfigError("model.dilated.segment_lengths and dilation_rates must have the same length (one rate "
                          "per segment length), or both be empty to derive them from w0/alpha")


def _validate_rope_scaling(r) -> None:
    kinds = ("none", "linear", "llama3", "yarn")
    if r.type not in kinds:
        raise ConfigError(f"model.rope_scaling.type={r.type!r}: choose one of {', '.join(kinds)}")
    if r.type == "none":
        return
    for key in ("factor", "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow"):
        if not math.isfinite(getattr(r, key)):  # an infinite factor zeroes every frequency: no positions at all
            raise ConfigError(f"model.rope_scaling.{key} must be a finite number, got {getattr(r, key)}")
    if not r.factor >= 1:
        raise ConfigError(f"model.rope_scaling.factor must be >= 1 (how many times the trained length), got {r.factor}")
    if r.type in ("llama3", "yarn") and r.original_max_positions < 1:
        raise ConfigError(f"model.rope_scaling.type={r.type} needs model.rope_scaling.original_max_positions (the "
                          f"length the model was trained at), got {r.original_max_positions}")
    if r.type == "llama3" and not 0 < r.low_freq_factor < r.high_freq_factor:
        raise ConfigError(f"model.rope_scaling needs 0 < low_freq_factor < high_freq_factor, got "
                          f"{r.low_freq_factor} and {r.high_freq_factor}")
    if r.type == "yarn" and not 0 < r.beta_slow < r.beta_fast:
        raise ConfigError(f"model.rope_scaling needs 0 < beta_slow < beta_fast, got {r.beta_slow} and {r.beta_fast}")

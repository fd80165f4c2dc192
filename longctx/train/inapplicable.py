"""Settings a job would leave without effect, refused by name with what makes them apply: a setting given in
a config is either used or an error, never silently ignored (a data.path the synthetic source never opens, a
RoPE scaling factor of type none, a window on layers that are all dilated). A setting counts as given when it
differs from the schema's default, so a config that spells out defaults stays valid."""

from __future__ import annotations

from ..config import (
    CheckpointConfig,
    ConfigError,
    DataConfig,
    DilatedConfig,
    ParallelConfig,
    RopeScalingConfig,
    TrainConfig,
    ValidationConfig,
)
from ..data.sources import packs_documents

# the data settings each source reads (besides source, workers and the validation section)
_DATA_KEYS = {
    "synthetic": ("task", "alphabet", "period", "mask_prompt"),
    "tokens": ("path", "shuffle"),
    "passkey": ("alphabet", "digits", "pack_min", "haystack"),
    "needle": ("alphabet", "digits", "depth", "pack_min", "haystack"),
    "recall": ("alphabet", "digits", "pairs", "pack_min", "haystack"),
}
# those refused where unread: what names or orders the data or shapes a retrieval task (the synthetic task's
# own settings, often left in a config whose data.source is switched on the command line, are not)
_CHECKED_DATA_KEYS = ("path", "shuffle", "digits", "depth", "pairs", "pack_min", "haystack")
# the model.rope_scaling keys each type reads (longctx/model/rope.py: rope_frequencies)
_SCALING_KEYS = {
    "none": (),
    "linear": ("factor",),
    "llama3": ("factor", "original_max_positions", "low_freq_factor", "high_freq_factor"),
    "yarn": ("factor", "original_max_positions", "beta_fast", "beta_slow"),
}


def check_inapplicable(cfg) -> None:
    """ConfigError for the first setting this job would ignore."""
    _check_data(cfg.data)
    _check_model(cfg.model)
    _check_parallel(cfg)
    _check_validation(cfg.validation)
    _check_schedule(cfg.train)
    _check_checkpoint(cfg.checkpoint)


def _given(section, defaults, key: str) -> bool:
    return getattr(section, key) != getattr(defaults, key)


def _first_given(section, defaults, keys) -> str | None:
    """The first of `keys` given in `section` (differing from `defaults`), or None."""
    return next((key for key in keys if _given(section, defaults, key)), None)


def _check_data(data) -> None:
    reads = _DATA_KEYS.get(data.source)
    if reads is None:  # an unknown source: build_source names the choices
        return
    defaults = DataConfig()
    unused = [key for key in _CHECKED_DATA_KEYS if key not in reads and _given(data, defaults, key)]
    if unused:
        users = sorted(source for source, keys in _DATA_KEYS.items() if unused[0] in keys)
        raise ConfigError(f"data.{unused[0]}={getattr(data, unused[0])!r} is not read by data.source={data.source}; it "
                          f"applies to data.source={' or '.join(users)}: set that source, or drop data.{unused[0]}")


def _check_model(model) -> None:
    scaling, defaults = model.rope_scaling, RopeScalingConfig()
    if model.hf_path and scaling.type != "none":
        raise ConfigError(f"model.rope_scaling.type={scaling.type} with model.hf_path: a Hugging Face model's RoPE "
                          "is its config.json's (rope_parameters / rope_scaling); set the scaling there, and drop "
                          "model.rope_scaling")
    reads = _SCALING_KEYS.get(scaling.type)
    given = [key for key in vars(defaults) if key != "type" and key not in (reads or ()) and
             _given(scaling, defaults, key)]
    if reads is not None and given:
        users = [kind for kind, keys in _SCALING_KEYS.items() if given[0] in keys]
        raise ConfigError(f"model.rope_scaling.{given[0]}={getattr(scaling, given[0])} has no effect with "
                          f"model.rope_scaling.type={scaling.type} (it reads {', '.join(reads) or 'nothing'}); "
                          f"{given[0]} applies to type={' or '.join(users)}: set that type, or drop it")
    if model.window == 1:  # softmax over one score is 1 whatever q and k are: their gradients are exactly zero
        raise ConfigError("model.window=1 lets each token attend to itself only, so the attention's q and k "
                          "projections have no effect (zero gradients, which AdamW would turn into steps of rounding "
                          "noise); use model.window >= 2, or null for full causal attention")
    dilated, plain = model.dilated, DilatedConfig()
    if not dilated.layers:
        key = _first_given(dilated, plain, ("segment_lengths", "dilation_rates", "w0", "alpha"))
        if key:
            raise ConfigError(f"model.dilated.{key}={getattr(dilated, key)} has no effect without dilated "
                              "layers; list them in model.dilated.layers, or drop it")
    elif dilated.segment_lengths and (key := _first_given(dilated, plain, ("w0", "alpha"))):
        raise ConfigError(f"model.dilated.{key}={getattr(dilated, key)} has no effect: model.dilated.segment_lengths "
                          "are given, and w0/alpha only derive them when they are not; drop one or the other")
    elif model.window is not None and set(dilated.layers) >= set(range(model.n_layers)):
        raise ConfigError(f"model.window={model.window} has no effect: every layer is dilated (model.dilated.layers), "
                          "and dilated layers attend by their segments; drop model.window, or leave some layer "
                          "undilated")


def _check_parallel(cfg) -> None:
    p, defaults = cfg.parallel, ParallelConfig()
    if p.activation_checkpoint != "selective" and _given(p, defaults, "ac_every"):
        raise ConfigError(f"parallel.ac_every={p.ac_every} applies to parallel.activation_checkpoint=selective (this "
                          f"job: {p.activation_checkpoint}); set that, or drop parallel.ac_every")
    packed = packs_documents(cfg.data)
    if p.balance_documents and not packed:
        raise ConfigError(f"parallel.balance_documents=true reorders the documents packed in a sequence, and "
                          f"data.source={cfg.data.source} packs none (data.source=tokens does, and the retrieval "
                          "sources with data.pack_min > 0); drop it")
    if p.balance_documents and p.strategy == "ulysses":
        raise ConfigError("parallel.balance_documents=true evens out the context ranks' shares of a sequence, and "
                          "parallel.strategy=ulysses gives every rank the whole sequence (for some heads), so there is "
                          "nothing to balance; drop it, or use a ring strategy (zigzag, ring, striped, hybrid)")
    if p.reshard_after_forward != defaults.reshard_after_forward and p.engine in ("ddp", "deepspeed"):
        raise ConfigError(f"parallel.reshard_after_forward={str(p.reshard_after_forward).lower()} is an FSDP2 "
                          f"setting, and parallel.engine={p.engine} never reads it; drop it, or use "
                          "parallel.engine=fsdp")


def _check_validation(validation) -> None:
    if validation.interval:
        return
    # (validation.holdout is not among them: its windows stay out of training, kept for a later `longctx eval`)
    key = _first_given(validation, ValidationConfig(), ("batches", "path"))
    if key:
        raise ConfigError(f"validation.{key}={getattr(validation, key)!r} has no effect with "
                          "validation.interval=0 (validation off); set validation.interval=N to validate every N "
                          f"steps, or drop validation.{key}")


def _check_schedule(train) -> None:
    if train.lr_schedule != "constant":
        return
    key = _first_given(train, TrainConfig(), ("min_lr_ratio", "decay_steps"))
    if key:
        raise ConfigError(f"train.{key}={getattr(train, key)} has no effect with train.lr_schedule=constant "
                          "(the lr stays at its peak after the warmup); for a decay at the end (warmup-stable-decay) "
                          f"set train.lr_schedule=linear or cosine with train.decay_steps, or drop train.{key}")


def _check_checkpoint(checkpoint) -> None:
    if checkpoint.interval or checkpoint.on_signal:
        return
    key = _first_given(checkpoint, CheckpointConfig(), ("keep_last", "async_save"))
    if key:
        raise ConfigError(f"checkpoint.{key}={getattr(checkpoint, key)} has no effect: this run writes no "
                          "checkpoint (checkpoint.interval=0 and checkpoint.on_signal=false); set "
                          f"checkpoint.interval=N to save every N steps, or drop checkpoint.{key}")

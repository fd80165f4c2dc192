"""A new training stage from another run's weights (`train.init_from`): context extension (train at 4k,
then at 32k with another RoPE base), a fine-tune after pretraining. Only the model's weights are read;
the optimizer, the LR schedule, the step and the data stream start afresh. The checkpoint may come from
any layout or engine (DCP reshards into this run's pieces; a DeepSpeed checkpoint's full weights are
sliced), and settings that keep the parameters' shapes may change (seq_len, rope_theta, windows, the
parallel layout); a shape that differs is refused, naming the model settings that differ. A Hugging Face
LlamaForCausalLM directory starts the native model the same way (Llama 3.x with its llama3 RoPE: each
rank reads its slices of the safetensors).

It applies only when the run starts fresh: with train.resume=auto an interrupted stage continues from its
own checkpoints, so `train.init_from=A train.resume=auto` is safe to restart as often as needed."""

from __future__ import annotations

import os

import torch

from .checkpoint import check_fits, flat_options, saved_name, unfit_error
from .checkpoint_dirs import agree_checkpoint, locate, weight_files
from .checkpoint_read import Mismatch, load_file, read_dcp, saved_entries
from .same_run import saved_config
from .weights import full_weights

_FIX = ("train.init_from takes a checkpoint of a model with the same shapes (sequence length, RoPE and windows "
        "may change)")


def init_weights(trainer, spec: str) -> tuple[str, int | None]:
    """Read the model weights of the checkpoint `spec` names (or the newest complete one under a root) into
    the trainer's model, as it is split (collective); returns the checkpoint used and the step it was
    written at. Its weight files are checked against their digests first. A Hugging Face Llama directory
    (config.json + safetensors) starts the native model from its weights (step None)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    what = f"train.init_from={spec!r}"
    if os.path.isfile(os.path.join(spec, "config.json")):
        _from_hugging_face(trainer, spec, what)
        return spec, None
    path = agree_checkpoint(lambda skip: locate(spec, what, trainer._say, skip), spec, what, trainer.rank,
                            trainer.world, trainer._say, only=weight_files)
    step = int(load_file(path, "trainer.pt")["step"])
    _check_heads(trainer, path, what)
    full = os.path.isfile(os.path.join(path, "model.pt"))  # DeepSpeed's checkpoints hold the full weights
    if trainer.engine is None and not full:  # each rank reads its own pieces
        # the model's alone: get_state_dict with the optimizer would create its state by a step of zero
        # gradients, and the first real step would then correct Adam's moments for a second step
        mine = get_model_state_dict(trainer.model, options=flat_options())
        _check_nothing_left(trainer, path, {saved_name(trainer, key) for key in mine},
                            {key.removeprefix("model.") for key in saved_entries(path) if key.startswith("model.")})
        tied = _tied_groups(trainer, trainer.plan.stages or [trainer.model])
        if tied:  # each rank reads the tied entries whole (an embedding's size), to compare them
            _check_ties(trainer, path, full_weights(path, only={n for names in tied for n in names}), tied)
        try:
            read_dcp({"model": {saved_name(trainer, key): value for key, value in mine.items()}}, path)
        except Mismatch as e:
            raise unfit_error(trainer, path, e.detail, _FIX) from None
        set_model_state_dict(trainer.model, mine, options=flat_options())
        return path, step
    weights = full_weights(path, mmap=True)
    check_fits(trainer, path, weights, fix=_FIX)
    modules = [trainer.engine.module] if trainer.engine is not None else trainer.plan.stages or [trainer.model]
    # every name of a tied parameter: the full weights list the output head under its own name too
    names = {saved_name(trainer, n) for m in modules for n, _ in m.named_parameters(remove_duplicate=False)}
    _check_nothing_left(trainer, path, names, set(weights))
    _check_ties(trainer, path, weights, _tied_groups(trainer, modules))
    if trainer.engine is not None:
        _fresh_deepspeed(trainer, weights)
    else:
        mine = {key: weights[saved_name(trainer, key)] for key in get_model_state_dict(trainer.model)}
        set_model_state_dict(trainer.model, mine, options=StateDictOptions(full_state_dict=True))
    return path, step


def _check_nothing_left(trainer, path: str, mine: set, saved: set) -> None:
    """Every weight of the checkpoint has a place in this model (collective: a pipeline stage holds only its own
    layers, so the names are pooled over the ranks). One that has none (Qwen2's q/k/v biases read into a Llama,
    an untied head into a tied model) would be dropped, and the stage would start from another model."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        pooled = [None] * dist.get_world_size()
        dist.all_gather_object(pooled, sorted(mine))
        mine = {name for names in pooled for name in names}
    left = sorted(saved - mine)
    if left:
        raise unfit_error(trainer, path, f"it holds {', '.join(left[:3])}{' ...' if len(left) > 3 else ''}, which this "
                          "model has no place for", _FIX)


def _tied_groups(trainer, modules) -> list[list[str]]:
    """The saved names of each parameter this model ties (an output head that is the embedding)."""
    from ..model.hf_load import tied_names

    groups = [[saved_name(trainer, n) for n in names] for m in modules for names in tied_names(m)]
    if trainer.plan.tied is not None:  # a pipeline's copy of the embedding on the last stage (parallel/tied.py)
        groups.append([saved_name(trainer, trainer.plan.tied.embedding_name),
                       saved_name(trainer, trainer.plan.tied.head_name)])
    return groups


def _say_rope_change(trainer, theirs, what: str) -> None:
    """A stage may change the RoPE (context extension does), but one that changes it by leaving model.rope_*
    at the schema's defaults reads a Llama 3's positions with another base: said, with the settings to keep."""
    from omegaconf import OmegaConf

    from ..config import RopeScalingConfig

    ours, defaults = trainer.cfg.model, vars(RopeScalingConfig())

    def rope(m) -> dict:  # the base, and the scaling settings that are not the schema's defaults
        scaling = OmegaConf.to_container(OmegaConf.create(m.rope_scaling))
        given = {k: v for k, v in scaling.items() if k == "type" or v != defaults[k]}
        return {"rope_theta": float(m.rope_theta), **({"rope_scaling": given} if given["type"] != "none" else {})}

    if rope(theirs) != rope(ours):
        keep = ", ".join(f"model.rope_scaling.{k}={v}" for k, v in rope(theirs).get("rope_scaling", {}).items())
        trainer._say(f"longctx: note: {what} was trained with RoPE {rope(theirs)}, and this stage computes with "
                     f"{rope(ours)}; that is a context-extension stage's choice, else set model.rope_theta="
                     f"{theirs.rope_theta:g}{', ' + keep if keep else ''} to keep its positions")


def _check_ties(trainer, path: str, weights: dict, groups: list[list[str]]) -> None:
    """A tied parameter must be one tensor in the checkpoint too: an untied model's two would both load into
    it, the last one read silently winning. `weights`: the full tensors of (at least) the tied names, the
    same on every rank, so every rank decides alike."""
    for names in groups:
        held = [n for n in names if n in weights]
        apart = [n for n in held[1:] if not torch.equal(weights[n], weights[held[0]])]
        if apart:
            raise unfit_error(trainer, path, f"it holds {held[0]} and {apart[0]} as different tensors (an untied "
                              "output head), which this model ties", _FIX)


def _check_heads(trainer, path: str, what: str) -> None:
    """Heads x head width is a weight's shape, so other head counts (4 x 8 read as 2 x 16) would load and compute
    another function: the checkpoint's head settings (its config.yaml) must be this run's."""
    from ..config import ConfigError, head_dim_of

    saved = saved_config(path)
    if saved is None:  # a checkpoint without a readable config is checked by its shapes alone
        return
    theirs, ours = saved.model, trainer.cfg.model
    widths = [(m.dim, m.n_heads * head_dim_of(m), m.n_kv_heads * head_dim_of(m)) for m in (theirs, ours)]
    if widths[0] != widths[1]:  # other weight shapes: the shape check names the sizes that differ
        return
    differ = [f"model.{k}={getattr(theirs, k)} (this run: {getattr(ours, k)})" for k in ("n_heads", "n_kv_heads")
              if getattr(theirs, k) != getattr(ours, k)]
    if head_dim_of(theirs) != head_dim_of(ours):
        differ.append(f"model.head_dim={head_dim_of(theirs)} (this run: {head_dim_of(ours)})")
    if differ:
        raise ConfigError(f"{what} does not fit this model: it has {', '.join(differ)}, the same weight shapes "
                          f"split into other heads; set those ({_FIX})")


def _fresh_deepspeed(trainer, weights: dict) -> None:
    """Full weights into a DeepSpeed engine's pieces, with Adam's moments at zero and step 0: a fresh
    optimizer's (stride-0 zeros: nothing allocated)."""
    from ..parallel import deepspeed_engine

    zeros = {name: {key: torch.zeros(1).expand(w.numel()) for key in deepspeed_engine.ADAM_STATES}
             for name, w in weights.items()}
    deepspeed_engine.load_full_state(trainer.engine, weights, zeros, 0)


def _from_hugging_face(trainer, path: str, what: str) -> None:
    """A Hugging Face LlamaForCausalLM directory's weights into the native model's pieces: each rank reads
    its slices from the safetensors (DCP's HuggingFaceStorageReader), in whatever dtype they were stored.
    Its shapes must be this run's model settings; its RoPE may differ (a context-extension stage)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    from ..config import ConfigError, head_dim_of
    from ..model.hf_checks import read_hf_config
    from ..model.hf_load import stored_safetensors
    from ..model.hf_weights import hf_names, llama_config

    ours = trainer.cfg.model
    if ours.hf_path:
        raise ConfigError(f"{what} is a Hugging Face directory, and with model.hf_path the run starts from that "
                          "model's own weights: give train.init_from a longctx checkpoint, or leave it out")
    try:
        theirs = llama_config(read_hf_config(path), what)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sizes = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim")
    differ = [f"model.{k}={getattr(theirs, k)} (this run: {getattr(ours, k)})" for k in sizes
              if getattr(theirs, k) != getattr(ours, k)]
    if head_dim_of(theirs) != head_dim_of(ours):
        differ.append(f"model.head_dim={head_dim_of(theirs)} (this run: {head_dim_of(ours)})")
    if theirs.norm_eps != ours.norm_eps:  # no shape shows it, and the schema's default is not Llama's
        differ.append(f"model.norm_eps={theirs.norm_eps} (this run: {ours.norm_eps})")
    if differ:
        raise ConfigError(f"{what} does not fit this model: it has {', '.join(differ)}; set those (its RoPE may "
                          "differ from this run's)")
    _say_rope_change(trainer, theirs, what)
    reader = HuggingFaceStorageReader(path)
    stored = stored_safetensors(path, what, reader)
    names = {k: v if v in stored or v != "lm_head.weight" else "model.embed_tokens.weight"  # a tied head
             for k, v in hf_names(ours.n_layers).items()}
    absent = sorted({v for v in names.values() if v not in stored})
    if absent:
        raise ConfigError(f"{what} has no weights for {', '.join(absent[:4])}{' ...' if len(absent) > 4 else ''}; "
                          "its safetensors do not match its config.json (give the directory save_pretrained wrote)")
    if trainer.engine is not None:  # DeepSpeed holds flat partitions: full weights (a tied pair shares one)
        read = {source: torch.empty(stored[source].size, dtype=torch.float32) for source in set(names.values())}
        dcp.load(read, storage_reader=reader, no_dist=True)
        _fresh_deepspeed(trainer, {name: read[source] for name, source in names.items()})
        return
    mine = get_model_state_dict(trainer.model, options=flat_options())
    first, again = {}, {}  # a tied head read from the embedding's entry: in a second read of its own
    for key, tensor in mine.items():
        source = names[saved_name(trainer, key)]
        (again if source in first else first)[source] = tensor
    for part in (first, again):  # collective: every rank reads twice, its second part maybe empty
        dcp.load(part, storage_reader=HuggingFaceStorageReader(path))
    set_model_state_dict(trainer.model, mine, options=flat_options())

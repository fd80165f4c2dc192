"""A resume continues the run that wrote the checkpoint: what its config.yaml says of the model and the data,
compared with this run's (train/checkpoint.py's `load` asks; init_from and the messages of a load that does not
fit read the model's differences too)."""

from __future__ import annotations

import os

from omegaconf import OmegaConf

from ..config import ConfigError

# what may differ on resume without changing the function the weights compute: where an HF model is read from
_MODEL_LOCATION = ("hf_path",)
# of the data section, what does not decide the training data stream: how many processes read it
_DATA_READERS = ("workers",)
# what a resume takes from this run's config rather than the checkpoint (optim.apply_settings), said when changed
_OPTIMIZER = ("lr", "weight_decay", "beta1", "beta2", "eps", "warmup_steps", "min_lr_ratio", "lr_schedule",
              "decay_steps", "steps")


HF_CONFIG = "hf_config.json"  # a checkpoint's copy of the model.hf_path config.json it was trained with
# what a config.json records of its writing, not of the function the model computes
_HF_BOOKKEEPING = ("transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "output_attentions",
                   "output_hidden_states", "return_dict")


def hf_config_changes(path: str, hf_path: str | None) -> str:
    """The settings of `hf_path`'s config.json that differ from the copy checkpoint `path` holds, as
    "sliding_window=6 (now None)", or "" when none does (or either is missing: older checkpoints hold no copy,
    a missing directory is refused where it is read)."""
    import json

    saved_file, current_file = os.path.join(path, HF_CONFIG), os.path.join(hf_path or "", "config.json")
    if not hf_path or not os.path.isfile(saved_file) or not os.path.isfile(current_file):
        return ""
    with open(saved_file) as f, open(current_file) as g:
        saved, current = json.load(f), json.load(g)
    keys = sorted((set(saved) | set(current)) - set(_HF_BOOKKEEPING))
    changed = [f"{k}={saved.get(k)!r} (now {current.get(k)!r})" for k in keys if saved.get(k) != current.get(k)]
    return ", ".join(changed[:4]) + (f" and {len(changed) - 4} more" if len(changed) > 4 else "")


def check_hf_config_unchanged(path: str, hf_path: str | None, fix: str) -> None:
    """The Hugging Face model read for checkpoint `path` is the one it was trained as: its config.json decides
    windows, RoPE and more that no weight shape shows."""
    changes = hf_config_changes(path, hf_path)
    if changes:
        raise ConfigError(f"model.hf_path={hf_path!r}: its config.json is not the one checkpoint {path} was written "
                          f"with ({changes}), and computes another function with these weights; {fix} (the "
                          f"checkpoint's copy is {os.path.join(path, HF_CONFIG)})")


def check_same_run(trainer, path: str) -> None:
    """A resume continues the run that wrote `path`: a model setting whose change keeps every shape (heads and
    K/V heads of the same total width, the RoPE base or scaling, a window) would load silently and compute
    something else, so it is refused, pointing at train.init_from (a new stage); a change to what decides the
    data stream is said, as the data continues at the checkpoint's sequence count in this run's data; so is a
    change to the optimizer's settings or the schedule, which this run's config decides from the next step."""
    saved = saved_config(path)
    if saved is None:
        return
    changes = _differences(saved.model, trainer.cfg.model, ignore=_MODEL_LOCATION)
    config = os.path.join(path, "config.yaml")
    check_hf_config_unchanged(path, trainer.cfg.model.hf_path, "restore it to resume, or start a new stage from "
                              f"the weights with train.init_from={path} (RoPE and windows may change there)")
    if changes:
        raise ConfigError(f"checkpoint {path} was written with {changes}: a resumed run continues the model that "
                          f"wrote it; resume with the config it was written with ({config}), or start a new stage "
                          f"from its weights with train.init_from={path} (RoPE base and scaling, windows and layout "
                          "may change there)")
    saved, here = OmegaConf.to_container(saved), OmegaConf.to_container(trainer.cfg)
    keys = [("data", k) for k in here["data"] if k not in _DATA_READERS] + [("train", "seed")]
    moved = [f"{a}.{b}={saved[a].get(b)} (this run: {here[a][b]})" for a, b in keys if saved[a].get(b) != here[a][b]]
    if moved:
        trainer._say(f"longctx: warning: {path} was written with {', '.join(moved)}: the data continues after the "
                     "sequences the checkpoint consumed, counted in this run's data, not where its own left off")
    tuned = [f"train.{k}={here['train'][k]} (the checkpoint's: {saved['train'][k]})" for k in _OPTIMIZER
             if k in saved["train"] and saved["train"][k] != here["train"][k]]
    if tuned:
        trainer._say(f"longctx: resuming with {', '.join(tuned)}: the optimizer and LR schedule follow this run's "
                     "settings from the next step")


def saved_config(path: str):
    """The config that wrote checkpoint `path` (its config.yaml, resolved), or None when it cannot be read."""
    from ..config import load as load_config

    try:
        return load_config(path=os.path.join(path, "config.yaml"))
    except Exception:  # noqa: BLE001 - what it is used for is a message or a check that needs it
        return None


def _effective(model: dict) -> dict:
    """A model section without the settings that do nothing (scaling factors of type none, dilated settings
    without dilated layers; written by runs from before they were refused), so they never count as changes."""
    model = dict(model)
    if model["rope_scaling"]["type"] == "none":
        model["rope_scaling"] = {"type": "none"}
    if not model["dilated"]["layers"]:
        model["dilated"] = {"layers": []}
    if model.get("hf_path"):  # read from its config.json, which runs before 2026-11-29 misread as 10000 when a
        model.pop("rope_theta", None)  # transformers 5 config kept it in rope_parameters; nothing computes with it
    return model


def model_changes(path: str, model_cfg, ignore=()) -> str:
    """The model settings of the checkpoint's config.yaml that differ from `model_cfg`, as "model.ffn_dim=64
    (this run: 96)", or "" when none does (or the file cannot be read)."""
    saved = saved_config(path)
    return "" if saved is None else _differences(saved.model, model_cfg, ignore)


def _differences(saved_model, model_cfg, ignore=()) -> str:
    saved, here = (_effective(OmegaConf.to_container(m)) for m in (saved_model, model_cfg))
    return ", ".join(f"model.{k}={saved[k]} (this run: {here.get(k)})" for k in saved
                     if k not in ignore and saved[k] != here.get(k))

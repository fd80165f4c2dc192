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

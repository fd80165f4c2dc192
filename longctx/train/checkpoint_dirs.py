"""Where checkpoints live and which are complete: `step_00000012/` directories under a checkpoint root,
each sealed by a `COMPLETE` marker listing every file with its size. A directory without the marker, or
whose files differ from it, was interrupted or damaged and is skipped (with the reason), never loaded.
What goes inside a checkpoint is train/checkpoint.py's; `load_file` and `read_error` turn a file that
cannot be read (changed after the marker was written: same size, other bytes) into a one-line error."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil

import torch

from ..config import ConfigError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def problem(path: str) -> str | None:
    """None if `path` is a complete checkpoint, else what is wrong with it."""
    marker = os.path.join(path, MARKER)
    if not os.path.isfile(marker):
        return "no completion marker (the write was interrupted)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable completion marker ({type(e).__name__})"
    for name, size in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"missing file {name}"
        if os.path.getsize(full) != size:
            return f"file {name} has {os.path.getsize(full)} bytes, {size} were written"
    return None


def complete_checkpoints(root: str, log=print) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first; incomplete ones are reported."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        m = _STEP_DIR.match(name)
        if not m:
            continue
        path = os.path.join(root, name)
        why = problem(path)
        if why:
            log(f"longctx: skipping checkpoint {path}: {why}")
        else:
            out.append((int(m.group(1)), path))
    return out


def continues(resume: str | None) -> bool:
    """Whether train.resume continues a run (auto, or a path) rather than starting a fresh one (none)."""
    return resume not in (None, "", "none")


def resolve_resume(resume: str, root: str, log=print) -> str | None:
    """The checkpoint directory to load for train.resume (auto | none | a path), or None."""
    if not continues(resume):
        return None
    if resume == "auto":
        found = complete_checkpoints(root, log)
        return found[-1][1] if found else None
    return locate(resume, f"train.resume={resume!r}", log)


def locate(path: str, what: str, log=print) -> str:
    """The complete checkpoint `path` names: itself (a step_NNNNNNNN directory) or the newest complete one
    under it (a checkpoint root). `what` names the argument in the errors."""
    if not os.path.exists(path):
        raise ValueError(f"{what or repr(path)} does not exist; give a checkpoint directory (step_NNNNNNNN) or a "
                         "checkpoint root")
    if _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        why = problem(path)
        if why:
            raise ValueError(f"{what} is not a complete checkpoint: {why}; pass an older one or its parent "
                             f"directory (the newest complete checkpoint there is taken)")
        return path
    found = complete_checkpoints(path, log)
    if not found:
        inside = os.path.join(path, "checkpoints")  # a run directory: its checkpoints are one level down
        hint = f"; it is a run directory: pass {inside}" if complete_checkpoints(inside, lambda *a: None) else ""
        raise ValueError(f"{what} holds no complete checkpoint (step_NNNNNNNN directories with a {MARKER} marker)"
                         f"{hint}")
    return found[-1][1]


def _files(tmp: str) -> dict:
    """Every file under `tmp` (relative path -> bytes): DCP writes flat, DeepSpeed into a sub-directory."""
    out = {}
    for root, _, names in os.walk(tmp):
        for n in names:
            full = os.path.join(root, n)
            out[os.path.relpath(full, tmp)] = os.path.getsize(full)
    return dict(sorted(out.items()))



def seal(tmp: str, final: str, root: str, step: int, keep_last: int) -> None:
    """Mark the fully written `tmp` complete and rename it to `final` (one process, after every rank's
    files are on disk), then drop all but the newest `keep_last` complete checkpoints (0: keep all)."""
    files = _files(tmp)  # before the marker exists: it does not list itself
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"step": step, "files": files}, f)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    for _, old in complete_checkpoints(root, log=lambda _: None)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# what torch.load and DCP raise for bytes that are not what was written (CheckpointException is a
# BaseException: DCP gathers every rank's error into one)
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError)


def load_file(path: str, name: str, **kwargs):
    """torch.load(weights_only=True) of one file of checkpoint `path`; a damaged file is a ConfigError."""
    try:
        return torch.load(os.path.join(path, name), weights_only=True, **kwargs)
    except _UNREADABLE as e:
        raise read_error(path, e, name) from None


def read_dcp(state: dict, path: str, *, no_dist: bool = False) -> None:
    """dcp.load of `state` (keyed by saved names) from checkpoint `path`, errors as read_error's one line.
    The .metadata is read first, so a damaged one fails here rather than after DCP logs a traceback per
    rank. no_dist: this process reads everything itself (no process group), as intended."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    saved_entries(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        except (CheckpointException, *_UNREADABLE) as e:  # CheckpointException: a BaseException
            raise read_error(path, e) from None


def saved_entries(path: str) -> dict:
    """{saved key: DCP metadata} of a DCP checkpoint; an unreadable .metadata is a ConfigError."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except _UNREADABLE as e:
        raise read_error(path, e, ".metadata") from None


def read_error(path: str, error: BaseException, name: str | None = None) -> ConfigError:
    """One line for a checkpoint read that failed: its weights do not fit the model it is read into (a
    shape or name the model does not have), or a file is damaged."""
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    # DCP gathers every rank's traceback: the planner's own line names the key and both shapes
    fits = ("size mismatch", "shape", "missing key", "unexpected key")
    first = next((ln for ln in lines if any(w in ln.lower() for w in fits)), None) or \
        next((ln for ln in lines if "Error:" in ln), lines[0] if lines else type(error).__name__)
    first = first.split(". ")[0]  # torch's explanations run on for lines
    config = os.path.join(path, "config.yaml")
    if isinstance(error, KeyError) or any(w in first.lower() for w in fits):
        return ConfigError(f"checkpoint {path} does not fit this model: {first[:300]} (a different model shape or "
                           f"pipeline layout?); use the config it was written with ({config})")
    what = f"its file {name}" if name else "its files"
    return ConfigError(f"checkpoint {path}: {what} cannot be read ({first[:200]}): the checkpoint is damaged (changed "
                       "after it was written); pass an older checkpoint")

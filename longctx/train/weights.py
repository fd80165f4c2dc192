"""A checkpoint's model weights outside training: one plain state dict (`export`, torch or Hugging Face
format, no process group), or this rank's pieces of a split model (`load_model_pieces`, for evaluation and
generation). Only the model's entries are read; the optimizer state stays on disk. A DCP checkpoint's
names are the unsplit model's under "model." (pipeline stages included); a DeepSpeed checkpoint's
`model.pt` holds the full fp32 weights."""

from __future__ import annotations

import os
import shutil

import torch
import torch.distributed as dist

from .._messages import first_line
from .checkpoint_dirs import check_contents, locate, weight_files
from .checkpoint_read import load_file, read_dcp, read_error, saved_entries


def model_weights(path: str, log=print) -> tuple[dict, str]:
    """(state dict of the unparallelised model, the checkpoint directory used) from a checkpoint or a
    checkpoint root (its newest complete one); no process group needed. Only the model's entries are read
    (the optimizer state, twice the model in fp32, stays on disk)."""
    path = locate(path, repr(path), log=log)
    check_contents(path, only=weight_files(path))
    return full_weights(path), path


def full_weights(path: str, mmap: bool = False, only: set | None = None) -> dict:
    """The model weights of complete checkpoint `path`, whole, by the unparallelised model's names: a
    DeepSpeed checkpoint's model.pt (memory-mapped with `mmap`), or a DCP checkpoint's model entries (each
    process reads them itself, with or without a process group); `only`: of a DCP checkpoint, just those."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if os.path.isfile(os.path.join(path, "model.pt")):  # a DeepSpeed checkpoint: its full weights
        return load_file(path, "model.pt", mmap=mmap)
    entries = _saved_model_entries(path)
    state = {name: torch.empty(md.size, dtype=md.properties.dtype) for name, (_, md) in entries.items()
             if isinstance(md, TensorStorageMetadata) and (only is None or name in only)}
    read_dcp({entries[name][0]: tensor for name, tensor in state.items()}, path, no_dist=True)
    return state


def _saved_model_entries(path: str) -> dict:
    """{the unsplit model's name: (the key it was saved under, its DCP metadata)} of a DCP checkpoint."""
    saved = saved_entries(path)
    return {key.removeprefix("model."): (key, md) for key, md in saved.items() if key.startswith("model.")}


def load_model_pieces(model, path: str, log=print) -> str:
    """Read a checkpoint's weights (not its optimizer state) into `model` as it is split (DTensor pieces: each
    rank reads its own slices through DCP; collective when a process group exists), whatever layout wrote
    it; returns the checkpoint directory used. A tied parameter is read once."""
    from ..model.hf_load import tied_names

    path = locate(path, repr(path), log=log)
    grouped = dist.is_initialized()
    check_contents(path, dist.get_rank() if grouped else 0, dist.get_world_size() if grouped else 1,
                   only=weight_files(path))
    mine = model.state_dict()
    full = None
    if os.path.isfile(os.path.join(path, "model.pt")):  # a DeepSpeed checkpoint: full weights, keep our pieces
        full = load_file(path, "model.pt")
        saved = {name: name for name in full}
    else:
        saved = {name: key for name, (key, _) in _saved_model_entries(path).items()}
    for names in tied_names(model):  # loaded once, under a name it was saved with
        keep = next((n for n in names if n in saved), names[0])
        for name in names:
            if name != keep:
                mine.pop(name, None)
    missing = sorted(set(mine) - set(saved))
    if missing:
        raise ValueError(f"checkpoint {path} has no {missing[0]} (and {len(missing) - 1} more) for this model: was it "
                         f"written by another model? its config is {os.path.join(path, 'config.yaml')}")
    if full is not None:
        from ..model.parallelize import write_local_piece

        with torch.no_grad():
            for name, tensor in mine.items():
                write_local_piece(tensor, full[saved[name]])
        return path
    read_dcp({saved[name]: tensor for name, tensor in mine.items()}, path, no_dist=not dist.is_initialized())
    return path


def export(path: str, out: str, fmt: str = "torch") -> dict:
    """A checkpoint's model weights as one plain state dict file that loads into the unparallelised model
    (fmt "torch"), or as a Hugging Face directory (config.json + safetensors) that transformers loads
    (fmt "hf"). Returns the state dict."""
    if fmt not in ("torch", "hf"):
        raise ValueError(f"--format {fmt!r}: choose torch or hf")
    if fmt == "torch" and os.path.isdir(out):
        raise ValueError(f"{out} is a directory; the torch format writes one file: give its path, e.g. "
                         f"{os.path.join(out, 'model.pt')}")
    if fmt == "hf" and os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"{out} is a file; the hf format writes a directory (config.json + safetensors): "
                         f"give a directory path")
    if fmt == "hf" and os.path.isdir(out) and os.listdir(out):
        # it may be the model the run started from (model.hf_path), or an older export whose shards would mix
        raise ValueError(f"{out} exists and is not empty; refusing to write a model into it (it may be the model "
                         "this run started from, and files of another export would stay beside the new ones): give "
                         "a new directory, or remove it first")
    from .._paths import check_output, replace_dir

    check_output(out, "OUT", "dir" if fmt == "hf" else "file")
    # a link is written through, as `data prepare` does: the file or directory it names is replaced, the link kept
    # (exchanged in place, the link itself became the export's directory and the swap's cleanup failed on it)
    final = os.path.realpath(out)
    if fmt == "torch" and os.path.exists(final) and not os.path.isfile(final):  # a device, a pipe
        raise ValueError(f"OUT {out} is not a regular file (a device or pipe): the export is written beside it and "
                         "renamed into place, which would replace it; give a file path")
    _outside_checkpoints(final)
    state, found = model_weights(path)
    # Written under a temporary name beside OUT and renamed into place when complete: a write that fails
    # (a full disk) leaves neither a half file that looks like a model nor a changed OUT.
    os.makedirs(os.path.dirname(final), exist_ok=True)
    partial = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial-{os.getpid()}")
    try:
        if fmt == "hf":
            _export_hf(state, found, partial)
            replace_dir(partial, final)  # OUT is absent or an empty directory here
        else:
            torch.save(state, partial)
            os.replace(partial, final)
    except BaseException as e:
        if os.path.isdir(partial):
            shutil.rmtree(partial, ignore_errors=True)
        elif os.path.lexists(partial):
            os.remove(partial)
        # a failed write: an OSError, safetensors' own error, or torch.save's RuntimeError from its zip writer
        if isinstance(e, OSError) or type(e).__name__ == "SafetensorError" or \
                (fmt == "torch" and isinstance(e, RuntimeError)):
            first = first_line(e)
            raise ValueError(f"OUT {out}: writing the export failed ({first}); nothing was left there and any "
                             "earlier export at that path is unchanged: free space or fix permissions, then run "
                             "it again") from e
        raise
    return state


def _outside_checkpoints(out: str) -> None:
    """OUT inside a checkpoint (a directory with a COMPLETE marker) would overwrite or add to files its marker
    lists: the checkpoint then reads as damaged, or (a model.pt) as a DeepSpeed one."""
    from .checkpoint_dirs import MARKER

    where = os.path.dirname(os.path.abspath(out))
    while True:
        if os.path.isfile(os.path.join(where, MARKER)):
            raise ValueError(f"OUT {out} is inside checkpoint {where}, whose files it would change (the checkpoint "
                             "would then read as damaged); write the export outside it")
        up = os.path.dirname(where)
        if up == where:
            return
        where = up


def distinct_parameters(state: dict, path: str) -> int:
    """The parameter count of an exported state dict: a tied output head, saved under both of its names (the
    embedding's and the head's), counts once. Which names are tied is the Hugging Face model's own
    tie_weights(); when its directory is gone, a head whose values equal the embedding's bit for bit."""
    from ..config import load as load_config

    count = sum(t.numel() for t in state.values())
    found = locate(path, repr(path), log=lambda *a, **k: None)
    hf_path = load_config(path=os.path.join(found, "config.yaml")).model.hf_path
    if not hf_path:  # the native model never ties its head
        return count
    if os.path.isdir(hf_path):
        from ..model.hf_load import build_hf_on_meta, tied_names

        groups = [[f"hf.{n}" for n in names] for names in tied_names(build_hf_on_meta(hf_path))]
    else:
        embed, head = "hf.model.embed_tokens.weight", "hf.lm_head.weight"
        same = embed in state and head in state and torch.equal(state[embed], state[head])
        groups = [[embed, head]] if same else []
    for names in groups:
        count -= sum(state[n].numel() for n in names[1:] if n in state)
    return count


def _export_hf(state: dict, found: str, out: str) -> None:
    from ..config import load as load_config
    from ..model.hf_weights import save_hf_llama

    cfg = load_config(path=os.path.join(found, "config.yaml"))
    if cfg.model.hf_path:  # an HF model trained as it is: its own class and config, our weights
        from .._optional import require
        from ..model.hf_checks import read_hf_config
        from .same_run import check_hf_config_unchanged

        transformers = require("transformers", "Hugging Face export")
        check_hf_config_unchanged(found, cfg.model.hf_path, "restore the one it was trained with")
        hf_cfg = read_hf_config(cfg.model.hf_path)
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(hf_cfg)
        try:
            model.load_state_dict({k.removeprefix("hf."): v for k, v in state.items()}, assign=True, strict=True)
        except RuntimeError as e:  # the checkpoint's weights against the architecture its config names
            raise read_error(found, e) from None
        model.save_pretrained(out, safe_serialization=True)
        # the model's own files over save_pretrained's defaults (its generation_config.json: the eos ids and
        # sampling settings generation stops and samples by)
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            src = os.path.join(cfg.model.hf_path, name)
            if os.path.exists(src):
                shutil.copy(src, out)
        return
    try:
        save_hf_llama(state, cfg.model, out, max_positions=max(cfg.train.seq_len, 2048))
    except RuntimeError as e:  # the weights against the model its config.yaml describes
        raise read_error(found, e) from None

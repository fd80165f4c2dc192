"""A Hugging Face checkpoint loaded piece by piece (`parallel.meta_init=true` with `model.hf_path`).

`from_pretrained` gives every rank the whole model before it is split: for a 70B model, 280 GB of fp32 per
rank in host memory. Here the architecture is built with its parameters on the meta device (no storage,
no initialisation) and its non-persistent buffers real (RoPE frequencies, embedding scales: values
`from_config` computes and a checkpoint does not hold); `parallelize_hf` splits it on the meta device;
then each rank allocates only its pieces (FSDP2 shards, tensor-parallel rows) and DCP's
HuggingFaceStorageReader reads exactly those slices from the safetensors files.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

import torch
from torch import nn

from .._optional import require
from ..config import ConfigError
from .hf import ATTN_IMPLEMENTATION, register_attention
from .hf_checks import check_hf_dir, read_hf_config


@contextmanager
def _parameters_on_meta():
    """Every parameter registered inside is moved to the meta device (its CPU storage is dropped at once)."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def build_hf_on_meta(path: str, dtype=torch.float32) -> nn.Module:
    """The causal LM of a local checkpoint directory: parameters on meta, buffers computed on CPU."""
    check_hf_dir(path)
    transformers = require("transformers", "Hugging Face models")
    from transformers.initialization import no_init_weights

    register_attention()
    config = read_hf_config(path)
    with no_init_weights(), _parameters_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                              attn_implementation=ATTN_IMPLEMENTATION)
    model.tie_weights()  # part of the init_weights that no_init_weights skipped (a tied head is one parameter)
    return model


def materialize(model: nn.Module, device) -> None:
    """Storage for the parameters (this rank's pieces) of a model built by build_hf_on_meta, on `device`,
    keeping the values of its buffers and its tied parameters one (to_empty alone would drop and untie them)."""
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    groups = tied_names(model)
    model.to_empty(device=device)  # a new parameter per module: a tied head would be cut from its embedding
    for names in groups:
        shared = model.get_parameter(names[0])
        for alias in names[1:]:
            owner, _, leaf = alias.rpartition(".")
            setattr(model.get_submodule(owner), leaf, shared)
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = value.to(device)


def stored_safetensors(path: str, what: str, reader=None) -> dict:
    """{name: DCP metadata} of the tensors in a Hugging Face directory's safetensors (one file, or the shards its
    index lists), for `what` (the setting that reads them piece by piece, which safetensors alone allow).
    A directory without them, a missing shard or an unreadable header is a ConfigError naming the file."""
    import glob

    from torch.distributed.checkpoint import HuggingFaceStorageReader

    if not glob.glob(os.path.join(path, "*.safetensors")):
        raise ConfigError(f"{what} reads the weights of {path} from safetensors, and it has none (only "
                          f"{', '.join(sorted(os.listdir(path)))}); save the model with save_pretrained "
                          "(safetensors, the default), or leave out " + what.split("=")[0])
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            shards = sorted(set(json.load(f).get("weight_map", {}).values()))
        gone = [name for name in shards if not os.path.isfile(os.path.join(path, name))]
        if gone:
            raise ConfigError(f"{path}: {', '.join(gone[:3])}, listed in model.safetensors.index.json, is not there; "
                              "copy the whole directory save_pretrained wrote")
    try:
        return (reader or HuggingFaceStorageReader(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - safetensors raises its own SafetensorError (header too small, ...)
        raise _unreadable(path, e) from None


def _unreadable(path: str, error: Exception) -> ConfigError:
    said = str(error).splitlines()[0][:200] if str(error) else ""
    return ConfigError(f"{path}: its safetensors cannot be read ({type(error).__name__}: {said}); save the model "
                       "again with save_pretrained")


def load_hf_pieces(model: nn.Module, path: str, device, tied_pair: tuple[str, str] | None = None) -> None:
    """Storage for this rank's pieces of a model built by build_hf_on_meta and parallelized, then their values
    from the checkpoint's safetensors (each rank reads its slices). Collective: every rank calls it.
    `tied_pair` (embedding, head): a pipeline stage's own copy of a tied head, read from the embedding's
    entry when the safetensors store the tied weight once."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    materialize(model, device)
    state = model.state_dict()
    reader = HuggingFaceStorageReader(path)
    stored = set(stored_safetensors(path, "parallel.meta_init=true", reader))
    source = {k: k for k in state}
    if tied_pair is not None and tied_pair[1] in state and tied_pair[1] not in stored:
        source[tied_pair[1]] = tied_pair[0]
    aliases = {name for names in tied_names(model) for name in names}
    tied = [k for k in state if source[k] not in stored and k in aliases]  # saved once, under the other name
    missing = [k for k in state if source[k] not in stored and k not in tied]
    if missing:
        raise ConfigError(f"model.hf_path={path!r} has no weights for {', '.join(missing[:4])}; its safetensors do "
                          f"not match its config.json")
    dcp.load({source[k]: v for k, v in state.items() if k not in tied}, storage_reader=reader)


def tied_names(model: nn.Module) -> list[list[str]]:
    """The names of each parameter registered under several names (a tied output head), grouped in
    registration order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def check_tied_files(model: nn.Module, path: str) -> None:
    """A model whose config.json ties its output head to its embedding while its safetensors hold the head with
    values of its own is refused: transformers unties such a model on load (meta_init=false), a model built from
    the config keeps them tied and drops the stored head (meta_init=true, evaluation), so layouts would train and
    evaluate two different models. Tensors are read only where a tied group is stored under two names (a tied
    model saved as usual stores it once: its embedding, a GB at 128k x 4096 in bf16, is not read here)."""
    import contextlib
    import glob

    from safetensors import safe_open

    tied = tied_names(model)
    if not tied:
        return
    holder = {}  # stored name -> its safetensors file

    @contextlib.contextmanager
    def opened(file):
        try:  # a cut or empty file: safetensors' own SafetensorError (or an OSError)
            with safe_open(file, framework="pt") as f:
                yield f
        except Exception as e:  # noqa: BLE001
            if not isinstance(e, OSError) and "safetensor" not in type(e).__name__.lower():
                raise
            raise _unreadable(path, e) from None

    def read(name):
        with opened(holder[name]) as f:
            return f.get_tensor(name)

    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        with opened(file) as f:
            holder.update(dict.fromkeys(f.keys(), file))
    for names in tied:
        kept, *others = [n for n in names if n in holder] or [None]
        for other in others:
            if not torch.equal(read(other), read(kept)):
                raise ConfigError(f"model.hf_path={path!r}: its config.json ties {other} to {kept} "
                                  "(tie_word_embeddings), but its safetensors hold it with values of its own, which "
                                  "transformers would not tie; set \"tie_word_embeddings\": false in its config.json "
                                  f"to train both, or save it without {other} to tie them")

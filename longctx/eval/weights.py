"""A trained checkpoint as a model to evaluate: its resolved config and its weights, on every rank, whole or
split over the tensor-parallel ranks of a mesh."""

from __future__ import annotations

import os

import torch

from ..config import load
from ..model import build_model
from ..parallel.tensor import apply_tensor_parallel, tp_misfit
from ..train.checkpoint_dirs import locate
from ..train.weights import load_model_pieces


def eval_device(device_type: str) -> torch.device:
    """This rank's GPU when the process group moves CUDA tensors, else the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")


def load_checkpoint_model(path: str, log=print, *, mesh=None, device=None):
    """(model, config) from a checkpoint or checkpoint root (its newest complete checkpoint), on `device`
    (default: the CPU). A checkpoint of a Hugging Face model (model.hf_path) is that architecture (from the
    directory it was trained from) with the checkpoint's weights, as an HFCausalLM whose attention runs on
    this process until a strategy is applied (generation and perplexity go through its own layers).

    The model is built on the meta device and only its weights are read from the checkpoint (DCP reads
    nothing of the optimizer state). `mesh`: a ParallelMesh with tp > 1 (e.g. ParallelDims(cp=world // tp,
    tp=tp, ...)): the model is split over mesh.tp first (an HF model with the inference split, no sequence
    parallelism) and each rank reads only its pieces (collective), so a model that needs tensor
    parallelism to fit can be evaluated; generate() and perplexity take mesh.cp as their group."""
    device = torch.device(device or "cpu")
    found = locate(path, path, log=log)
    cfg = load(path=os.path.join(found, "config.yaml"))
    tp = mesh.dims.tp if mesh is not None else 1
    check_eval_tp(cfg, tp)
    if cfg.model.hf_path:
        from ..model.hf import HFCausalLM, prepare_attention
        from ..model.hf_load import build_hf_on_meta, materialize
        from ..model.hf_tensor import apply_hf_tensor_parallel
        from ..train.same_run import check_hf_config_unchanged

        check_hf_config_unchanged(found, cfg.model.hf_path, "restore the one it was trained with")

        hf = build_hf_on_meta(cfg.model.hf_path)  # the architecture; its weights come from the checkpoint
        if tp > 1:
            apply_hf_tensor_parallel(hf, mesh.tp, sequence_parallel=False)
        materialize(hf, device)
        model = HFCausalLM(hf)
        load_model_pieces(model, found, log=log)
        # the kernel evaluation picks (as for a native model), not the training run's: eval computes in float32,
        # which a flash or triton kernel the run trained with on a GPU need not take
        prepare_attention(hf, "zigzag", None, None, "auto", cp=1)
        return model.eval(), cfg
    with torch.device("meta"):
        model = build_model(cfg.model, seq_len=cfg.train.seq_len)
    if tp > 1:
        apply_tensor_parallel(model, mesh.tp)
    model.to_empty(device=device)
    load_model_pieces(model, found, log=log)
    return model.eval(), cfg


def _tp_misfit(cfg, tp: int):
    if cfg.model.hf_path:
        from ..model.hf_tensor import hf_tp_misfit

        return hf_tp_misfit(cfg.model, tp, tp_as="--tp {}")
    return tp_misfit(cfg.model.n_heads, cfg.model.n_kv_heads, cfg.model.vocab_size, tp, cfg.model.ffn_dim,
                     tp_as="--tp {}")


def check_eval_tp(cfg, tp: int) -> None:
    """Whether a checkpoint's model (its resolved config) splits over `tp` tensor-parallel ranks. A trained
    model's sizes are fixed, so the message names the --tp values that fit, not training's fixes."""
    misfit = _tp_misfit(cfg, tp)
    if misfit:
        fits = [t for t in range(2, 65) if _tp_misfit(cfg, t) is None][:6]
        raise ValueError(f"--tp {tp} does not fit this checkpoint's model: {misfit.fact}; choose --tp "
                         + (f"{', '.join(map(str, fits))} or 1" if fits else "1 (no tensor-parallel split fits its "
                                                                              "sizes)"))


def checkpoint_tokenizer(cfg, spec: str | None = None):
    """The tokenizer a checkpoint's model reads: `spec` when given, else its Hugging Face directory's, else
    the one its prepared dataset was made with (checked against the recorded hash). None when nothing says
    (synthetic data: its token ids are the task's, not text)."""
    from ..data.tokenizer import load_tokenizer
    from ..data.tokens import read_meta

    if spec:
        tok = load_tokenizer(spec)
    elif cfg.model.hf_path and os.path.isfile(os.path.join(cfg.model.hf_path, "tokenizer.json")):
        tok = load_tokenizer(cfg.model.hf_path, what="model.hf_path")
    elif cfg.data.source == "tokens" and not os.path.isfile(os.path.join(cfg.data.path, "meta.json")):
        raise ValueError(f"the checkpoint's dataset data.path={cfg.data.path!r}, whose meta.json names the "
                         f"tokenizer the model was trained with, is not there (from {os.getcwd()}; a relative path is "
                         "read from the current directory); run from where it was trained, or pass that tokenizer as "
                         "--tokenizer")
    elif cfg.data.path and os.path.isfile(os.path.join(cfg.data.path, "meta.json")):
        try:  # a damaged meta.json is one line naming the file and the fix
            meta = read_meta(cfg.data.path, what="the checkpoint's data.path")
        except FileNotFoundError as e:
            raise ValueError(str(e)) from None
        if not isinstance(meta.get("tokenizer"), str):
            raise ValueError(f"the checkpoint's dataset {cfg.data.path}: meta.json names no tokenizer (written by "
                             "another tool, or edited); pass the tokenizer the model was trained with as --tokenizer")
        try:
            tok = load_tokenizer(meta["tokenizer"], what="the dataset's tokenizer")
        except ValueError as e:
            gone = meta["tokenizer"] != "byte" and not os.path.exists(meta["tokenizer"])
            raise ValueError(f"the checkpoint's dataset {cfg.data.path} was made with tokenizer {meta['tokenizer']!r}, "
                             f"which is not there any more; pass --tokenizer" if gone else f"{e}; pass --tokenizer"
                             ) from None
        if tok.sha256 != meta.get("tokenizer_sha256"):
            raise ValueError(f"{meta['tokenizer']} has changed since {cfg.data.path} was made with it (another "
                             "sha256); pass the tokenizer the model was trained with as --tokenizer")
    else:
        return None
    if tok.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer ({tok.name}) has {tok.vocab_size} ids but the model has "
                         f"model.vocab_size={cfg.model.vocab_size}: not the tokenizer it was trained with; pass "
                         "that one as --tokenizer")
    return tok

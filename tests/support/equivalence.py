"""A parallelized model against its single-device twin: outputs, and every parameter gradient by name."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx import kernels
from longctx.config import load
from longctx.model import build_model, parallelize
from longctx.parallel import ParallelDims

from .backends import check_ran, report

SMALL = ["model.dim=64", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=96", "model.n_layers=2"]


def grad_errors(model: torch.nn.Module, single: torch.nn.Module) -> dict[str, float]:
    """name -> max |grad - single grad|. Fails on any difference in names or shapes, or a missing grad: a
    parameter that one side lacks must never be skipped silently."""
    mine, ref = dict(model.named_parameters()), dict(single.named_parameters())
    assert mine.keys() == ref.keys(), (sorted(mine.keys() ^ ref.keys()), "parameter names differ")
    errs = {}
    for name, p in mine.items():
        p1 = ref[name]
        assert p.shape == p1.shape, (name, tuple(p.shape), tuple(p1.shape))
        assert p.grad is not None and p1.grad is not None, (name, "has no gradient")
        errs[name] = (p.grad - p1.grad).abs().max().item()
    return errs


def _twins(overrides, n: int):
    """(config, cp-over-the-world dims, the single-device model, its identical twin to parallelize), float64."""
    cfg = load(overrides=[*SMALL, *overrides])
    p = cfg.parallel
    dims = ParallelDims(dp_shard=1, cp=dist.get_world_size(), world_size=dist.get_world_size(), strategy=p.strategy,
                        ulysses=p.ulysses, layout=p.layout)

    def make():
        torch.manual_seed(0)
        return build_model(cfg.model, seq_len=n).double()

    return cfg, dims, make(), make()


def model_equivalence(overrides, n: int = 32):
    """One model on one device and its twin parallelized over the world, same weights and batch, float64.
    Returns (max |logits - single|, {param: max |grad - single|}, layout, repr, backends that ran)."""
    cfg, dims, single, model = _twins(overrides, n)
    tokens = torch.randint(0, cfg.model.vocab_size, (2, n + 1))
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    ref_logits = single(inp)
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    plan = parallelize(model, dims, cfg.parallel)
    batch = plan.shard_batch(inp, labels)
    kernels.reset_calls()
    logits = model(batch["input_ids"], batch["position_ids"])
    # the data-parallel engine averages over the cp ranks: scale so that the average is the sum
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum") * dims.dp_cp
    loss.backward()
    ran = report()
    err_logits = (logits - ref_logits[:, batch["position_ids"]]).abs().max().item()
    return err_logits, grad_errors(model, single), plan.layout, repr(model), ran


def ran_auto_everywhere(results) -> None:
    """Every rank of every run (results[rank][run]) trained on the backend `auto` must pick, no fallback."""
    for rank, per_rank in enumerate(results):
        for r in per_rank:
            check_ran(r["backends"], "auto", label=rank)


def compare_runs(name: str, got: dict, ref: dict, steps: int = 5, tol: float = 1e-5) -> None:
    """A parallel training run against the single-process one: every step's loss and gradient norm within
    `tol` relative, every final parameter (gathered to full tensors, compared by name) within `tol`."""
    assert got["finite"], name
    assert len(got["losses"]) == len(ref["losses"]) == steps, (name, len(got["losses"]))
    for step, (a, b) in enumerate(zip(got["losses"], ref["losses"])):
        assert abs(a - b) <= tol * abs(b), (name, step, a, b)
    for step, (a, b) in enumerate(zip(got["grad_norms"], ref["grad_norms"])):
        assert abs(a - b) <= tol * abs(b), (name, "grad norm", step, a, b)
    assert set(got["params"]) == set(ref["params"]), (name, sorted(set(got["params"]) ^ set(ref["params"])))
    for k, v in ref["params"].items():
        assert got["params"][k].shape == v.shape, (name, k)
    worst = max((got["params"][k] - ref["params"][k]).abs().max().item() for k in ref["params"])
    assert worst <= tol, (name, worst)


def compare_validation(name: str, got: dict, ref: dict, tol: float = 1e-5) -> None:
    """The held-out losses of a parallel run against the single-process run's: the same steps, each within
    `tol` relative."""
    assert list(got["validation"]) == list(ref["validation"]) and ref["validation"], (name, got["validation"])
    for step, b in ref["validation"].items():
        a = got["validation"][step]
        assert abs(a - b) <= tol * abs(b), (name, "validation", step, a, b)


def packed_equivalence(overrides, lengths, n: int = 32):
    """Packed documents through a parallelized model (float64) against the plain single-device model run on
    each document alone as its own sequence (positions from 0; nothing of Documents involved): logits of
    every token, and every parameter gradient of the summed per-document loss. `lengths`: per-row document
    lengths. Returns (max |logits - per-document|, {param: max |grad - per-document|}, the document starts
    the model was given)."""
    cfg, dims, single, model = _twins(overrides, n)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.model.vocab_size, (len(lengths), n + 1), generator=g)
    inp, labels = tokens[:, :-1], tokens[:, 1:].clone()
    doc_ids = torch.stack([torch.repeat_interleave(torch.arange(len(r)), torch.tensor(r)) for r in lengths])
    labels[:, :-1][doc_ids[:, 1:] != doc_ids[:, :-1]] = -100  # a document's last token predicts nothing
    ref_logits = torch.zeros(len(lengths), n, cfg.model.vocab_size, dtype=torch.float64)
    for b, row in enumerate(lengths):
        start = 0
        for length in row:
            sl = slice(start, start + length)
            out = single(inp[b:b + 1, sl])
            ref_logits[b, sl] = out[0].detach()
            F.cross_entropy(out.flatten(0, 1), labels[b, sl], reduction="sum", ignore_index=-100).backward()
            start += length
    plan = parallelize(model, dims, cfg.parallel)
    batch = plan.shard_batch(inp, labels, doc_ids)
    logits = model(batch["input_ids"], batch["position_ids"], documents=batch["documents"])
    loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum",
                           ignore_index=-100) * dims.dp_cp
    loss.backward()
    err_logits = (logits.detach() - ref_logits[:, batch["position_ids"]]).abs().max().item()
    return err_logits, grad_errors(model, single), batch["documents"].starts


def packed_equivalence_many(overrides_list, lengths, n: int = 32):
    """packed_equivalence for several configs in one process group (one launch)."""
    return [packed_equivalence(o, lengths, n) for o in overrides_list]

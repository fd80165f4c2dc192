"""Rank side of the Hugging Face tests: an HF model under parallelize_hf against its own eager run."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

N = 32  # tokens per sequence
BATCH = 2


def batch(vocab: int):
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, vocab, (BATCH, N + 1), generator=g)
    return tokens[:, :-1], tokens[:, 1:]  # labels shifted before any sharding


def eager_reference(path: str):
    """The unmodified model, eager attention, one process: summed loss and every gradient by name."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    inp, labels = batch(model.config.vocab_size)
    logits = model(input_ids=inp).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="sum")
    loss.backward()
    return float(loss), {n: _grad(p) for n, p in model.named_parameters()}


def _grad(p):
    """A parameter's (full) gradient; zeros for a trainable one the step gave none (an MoE router's
    correction bias, updated by a rule of its own)."""
    if p.grad is None:
        return torch.zeros(p.shape)
    return _full(p.grad).detach().clone()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def parallel_run(path: str, layout: dict) -> dict:
    """parallelize_hf over the world with `layout` (ParallelDims keywords); loss summed over ranks and every
    gradient (full tensors), in the HF model's own parameter names."""
    from longctx.model.hf import load_hf_model, parallelize_hf
    from longctx.parallel import ParallelDims

    world = dist.get_world_size()
    model = load_hf_model(path)
    dims = ParallelDims(world_size=world, **{"dp_shard": 1, **layout})
    plan = parallelize_hf(model, dims, rope_length=N)  # as the trainer pins it to train.seq_len
    inp, labels = batch(model.config.vocab_size)
    rows = slice(plan.dp_rank * BATCH // dims.dp, (plan.dp_rank + 1) * BATCH // dims.dp)
    shard = plan.shard_batch(inp[rows], labels[rows])
    loss = plan.model(shard["input_ids"], shard["position_ids"], labels=shard["labels"])
    (loss * dims.dp_cp).backward()  # the engines average over data x context ranks
    total = loss.detach().clone()
    dist.all_reduce(total)
    total /= dims.tp  # every tensor-parallel rank holds the same loss
    grads = {n.removeprefix("hf."): _grad(p) for n, p in plan.model.named_parameters()}
    return {"loss": float(total), "grads": grads, "engine": plan.engine,
            "tp_sharded": sorted(n.removeprefix("hf.") for n, p in plan.model.named_parameters() if _tp_shard(p))}


def _tp_shard(p) -> bool:
    """Whether this rank holds only a tensor-parallel piece of `p`."""
    from torch.distributed.tensor import Shard

    names = getattr(getattr(p, "device_mesh", None), "mesh_dim_names", None) or ()
    return "tp" in names and isinstance(p.placements[names.index("tp")], Shard)


def compare(path: str, layouts: list[dict]) -> list[dict] | None:
    """Each layout against the eager model, on rank 0 (the others take part in the parallel runs only)."""
    rank0 = dist.get_rank() == 0
    ref_loss, ref_grads = eager_reference(path) if rank0 else (None, None)
    out = []
    for layout in layouts:
        got = parallel_run(path, layout)
        if not rank0:
            continue
        assert set(got["grads"]) == set(ref_grads), sorted(set(got["grads"]) ^ set(ref_grads))
        errs = {n: ((g - ref_grads[n]).abs().max() / ref_grads[n].abs().max().clamp(min=1e-12)).item()
                for n, g in got["grads"].items()}
        out.append({"layout": layout, "loss": got["loss"], "ref_loss": ref_loss, "grad_rel_err": errs,
                    "engine": got["engine"], "tp_sharded": got["tp_sharded"]})
    return out if rank0 else None


def compare_all(jobs: list[tuple[str, str, list[dict]]]) -> list[tuple[str, list[dict]]]:
    """compare() for several (name, path, layouts) in one process group (rank 0's result holds the comparisons)."""
    return [(name, compare(path, layouts)) for name, path, layouts in jobs]


def tp_error(paths: list[str]) -> list[str]:
    """The error parallelize_hf raises for each model under tp = the world (or "no error")."""
    from longctx.model.hf import load_hf_model, parallelize_hf
    from longctx.parallel import ParallelDims

    errors = []
    for path in paths:
        try:
            parallelize_hf(load_hf_model(path), ParallelDims(world_size=dist.get_world_size(), dp_shard=1,
                                                             tp=dist.get_world_size()))
            errors.append("no error")
        except ValueError as e:
            errors.append(str(e))
    return errors


def packed_against_alone(path: str, lengths: list[int], layout: dict) -> dict:
    """One row packed with documents of `lengths` under parallelize_hf over the world (`layout`): the summed
    loss inside the documents and every gradient against the unmodified eager model run on each document
    alone (labels at a document's last token ignored)."""
    from transformers import AutoModelForCausalLM

    from longctx.data.labels import IGNORE_INDEX
    from longctx.model.hf import load_hf_model, parallelize_hf
    from longctx.parallel import ParallelDims

    n = sum(lengths)
    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, eager.config.vocab_size, (1, n + 1), generator=g)
    inp, labels = tokens[:, :-1], tokens[:, 1:].clone()
    doc_ids = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))[None]
    ends = torch.cumsum(torch.tensor(lengths), 0) - 1
    labels[0, ends] = IGNORE_INDEX  # a document's last token predicts nothing (the next one starts anew)
    ref_loss, start = 0.0, 0
    for length in lengths:
        logits = eager(input_ids=inp[:, start:start + length]).logits[0]
        keep = labels[0, start:start + length] != IGNORE_INDEX
        loss = F.cross_entropy(logits[keep], labels[0, start:start + length][keep], reduction="sum")
        loss.backward()
        ref_loss += float(loss)
        start += length
    ref = {name: _grad(p) for name, p in eager.named_parameters()}
    model = load_hf_model(path)
    dims = ParallelDims(world_size=dist.get_world_size(), **{"dp_shard": 1, **layout})
    plan = parallelize_hf(model, dims, rope_length=n)
    shard = plan.shard_batch(inp, labels, doc_ids)
    loss = plan.model(shard["input_ids"], shard["position_ids"], labels=shard["labels"],
                      documents=shard["documents"])
    (loss * dims.dp_cp).backward()
    total = loss.detach().clone()
    dist.all_reduce(total)
    grads = {n.removeprefix("hf."): _grad(p) for n, p in plan.model.named_parameters()}
    errs = {name: ((grad - ref[name]).abs().max() / ref[name].abs().max().clamp(min=1e-12)).item()
            for name, grad in grads.items()}
    return {"loss": float(total), "ref_loss": ref_loss, "grad_rel_err": errs}


def packed_through_a_layer_that_drops_kwargs(path: str) -> dict:
    """Unpacked logits of a model whose decoder layer drops the attention kwargs (Nemotron), against its eager
    run; and what a packed row does (the documents could not reach the attention)."""
    from transformers import AutoModelForCausalLM

    from longctx.model.hf import load_hf_model, parallelize_hf
    from longctx.parallel import ParallelDims
    from longctx.parallel.sequence.documents import Documents

    eager = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    tokens = torch.randint(0, eager.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    plan = parallelize_hf(load_hf_model(path), ParallelDims(world_size=1, dp_shard=1))
    logits = plan.model(tokens, torch.arange(32))
    out = {"unpacked_err": float((logits - eager(input_ids=tokens).logits).abs().max().detach())}
    try:
        plan.model(tokens, torch.arange(32), documents=Documents.from_ids(torch.tensor([[0] * 12 + [1] * 20])))
        out["packed"] = "ran"
    except Exception as e:  # noqa: BLE001 - the test reads what was raised
        out["packed"] = f"{type(e).__name__}: {e}"
    return out

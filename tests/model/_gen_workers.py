"""Rank side of the generation tests."""

from __future__ import annotations

import torch

from longctx.config import load
from longctx.model import build_model
from longctx.parallel import Comm

SMALL = ["model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64", "model.n_layers=2",
         "model.vocab_size=48"]


def tiny_model(*extra):
    torch.manual_seed(0)
    return build_model(load(overrides=[*SMALL, *extra]).model).float()


def hf_model(path):
    from longctx.model.hf import HFCausalLM, load_hf_model

    return HFCausalLM(load_hf_model(path))


def prompts(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 48, (n,), generator=g) for n in lengths]


def greedy_reference(model, prompt, steps):
    """No cache, no padding, one row at a time: the whole sequence through the model every step (a longctx
    Transformer, or a transformers model with its eager attention)."""
    seq, logits = prompt.clone(), []
    with torch.no_grad():
        for _ in range(steps):
            out = model(seq[None]) if hasattr(model, "tok_embeddings") else model(input_ids=seq[None]).logits
            out = out[0, -1].float()
            logits.append(out)
            seq = torch.cat([seq, out.argmax()[None]])
    return seq[prompt.numel():], torch.stack(logits)


def generate_case(case):
    model = hf_model(case["hf"]) if "hf" in case else tiny_model(*case.get("model", ()))
    model = model.to(case.get("device", "cpu"))
    ps = prompts(case["lengths"])
    comm = Comm.get(None)
    comm.stats.reset()
    res = model.generate(ps, max_new_tokens=case["steps"], strategy=case["strategy"], decode=case["decode"],
                         return_logits=True, **case.get("kw", {}))
    decode_bytes = comm.stats.bytes("decode")
    return {"tokens": [t.tolist() for t in res.tokens], "logits": torch.stack(res.logits).cpu(),
            "decode_bytes_per_token": decode_bytes / len(res.logits), "prompt_len": res.prompt_len}


def run_cases(cases):
    return [generate_case(c) for c in cases]


def tp_cases(cases):
    """Generation with the model split over tp ranks (apply_tensor_parallel) and the prompt over cp ranks."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from longctx.parallel.tensor import apply_tensor_parallel, tp_comm

    out = []
    for case in cases:
        tp = case["tp"]
        mesh = init_device_mesh("cpu", (dist.get_world_size() // tp, tp), mesh_dim_names=("cp", "tp"))
        if "hf" in case:  # the inference split (no sequence parallelism), or the training one (refused)
            from longctx.model.hf_tensor import apply_hf_tensor_parallel

            model = hf_model(case["hf"])
            apply_hf_tensor_parallel(model.hf, mesh["tp"], sequence_parallel=case.get("sp", False))
            tp_stats = Comm.get(model.hf.lm_head.weight.device_mesh).stats
            local = model.hf.model.layers[0].self_attn.q_proj.weight
        else:
            model = tiny_model(*case.get("model", ()))
            apply_tensor_parallel(model, mesh["tp"])
            # (a second mesh of one shape may hand DTensor the first one's groups)
            tp_stats = tp_comm(model.layers[0].attention.wq.weight).stats
            local = model.layers[0].attention.wq.weight
        tp_stats.reset()
        if case.get("sp"):
            try:
                model.generate(prompts(case["lengths"]), max_new_tokens=1, group=mesh["cp"].get_group())
            except ValueError as e:
                out.append({"error": str(e)})
            continue
        if case.get("group") == "world":
            try:
                model.generate(prompts(case["lengths"]), max_new_tokens=1)
            except ValueError as e:
                out.append({"error": str(e)})
            continue
        res = model.generate(prompts(case["lengths"]), max_new_tokens=case["steps"], strategy=case["strategy"],
                             decode=case["decode"], group=mesh["cp"].get_group(), return_logits=True)
        out.append({"tokens": [t.tolist() for t in res.tokens], "logits": torch.stack(res.logits),
                    "tp_bytes": tp_stats.bytes(), "local_wq": tuple(local.to_local().shape),
                    "prompt_len": res.prompt_len})
    return out

import torch
import torch.distributed as dist
import torch.nn.functional as F

from longctx.config import load
from longctx.model import apply_context_parallel, build_model
from longctx.parallel import shard_batch


def cp_vs_single(strategy: str, n: int = 32):
    torch.manual_seed(0)
    cfg = load(overrides=["dim=64", "n_heads=4", "n_kv_heads=2", "ffn_dim=96", "n_layers=2"])
    model = build_model(cfg).double()
    tokens = torch.randint(0, 256, (2, n + 1))
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    ref_logits = model(inp)
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    ref_grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    layout = apply_context_parallel(model, strategy)
    batch = shard_batch(inp, labels, layout)
    logits = model(batch["input_ids"], batch["position_ids"])
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").backward()
    err_logits = (logits - ref_logits[:, batch["position_ids"]]).abs().max().item()
    err_grad = 0.0
    for k, p in model.named_parameters():
        dist.all_reduce(p.grad)
        err_grad = max(err_grad, (p.grad - ref_grads[k]).abs().max().item())
    return err_logits, err_grad, layout

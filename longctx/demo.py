"""`make demo` / `longctx demo`: a short, real run on a simulated 4-rank CPU cluster.

1. the local kernel backends against the float64 oracle,
2. every sequence-parallel strategy on 4 gloo ranks (errors, bytes vs model, counted imbalance),
3. a small Llama-style model with zigzag context parallelism against the same model on one device.
"""

from __future__ import annotations

import argparse
import time

import torch

SMALL_MODEL = ["dim=64", "n_heads=4", "n_kv_heads=2", "ffn_dim=96", "n_layers=2"]


def model_equivalence(strategy: str, overrides=(), n: int = 32, dtype=torch.float64):
    """On each rank: one model on one device and its twin context-parallel over the world, same weights and
    batch. Returns (max logit err, max param-grad err, layout, repr of the parallel model)."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from .config import load
    from .model import apply_context_parallel, build_model
    from .parallel import LOCAL, shard_batch

    cfg = load(overrides=[*SMALL_MODEL, *overrides])

    def make(group):
        torch.manual_seed(0)
        return build_model(cfg, seq_len=n, group=group).to(dtype)

    single, model = make(LOCAL), make(None)
    tokens = torch.randint(0, cfg.vocab_size, (2, n + 1))
    inp, labels = tokens[:, :-1], tokens[:, 1:]
    ref_logits = single(inp)
    F.cross_entropy(ref_logits.flatten(0, 1), labels.flatten(), reduction="sum").backward()
    layout = apply_context_parallel(model, strategy)
    batch = shard_batch(inp, labels, layout)
    logits = model(batch["input_ids"], batch["position_ids"])
    F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="sum").backward()
    err_logits = (logits - ref_logits[:, batch["position_ids"]]).abs().max().item()
    err_grad = 0.0
    for p, p1 in zip(model.parameters(), single.parameters()):
        dist.all_reduce(p.grad)  # each rank's loss covers its tokens: the full gradient is the sum
        err_grad = max(err_grad, (p.grad - p1.grad).abs().max().item())
    return err_logits, err_grad, layout, repr(model)


def _kernels():
    from . import kernels

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 256, 8, 32), torch.randn(1, 256, 2, 32), torch.randn(1, 256, 2, 32)
    ref, _ = kernels.forward(q.double(), k.double(), v.double(), mask=kernels.Mask.causal(), backend="reference")
    for name, why in sorted(kernels.backend_status().items()):
        if why is not None:
            print(f"  {name:<10} unavailable: {why}")
            continue
        try:
            out, _ = kernels.forward(q, k, v, mask=kernels.Mask.causal(), backend=name)
        except ValueError as e:
            print(f"  {name:<10} skipped: {e}")
            continue
        print(f"  {name:<10} causal GQA fp32, max abs err vs float64 = {(out.double() - ref).abs().max():.2e}")


def main(argv=None) -> int:
    from .bench import attention as bench_attention
    from .launch import run

    t0 = time.time()
    print("== 1. local kernels (seq 256, 8 query heads over 2 kv heads) ==")
    _kernels()
    print("\n== 2. sequence-parallel attention on 4 simulated ranks (gloo processes) ==")
    p = argparse.ArgumentParser()
    bench_attention.add_arguments(p)
    args = p.parse_args(["--world-size", "4", "--seq-len", "1024", "--heads", "8", "--kv-heads", "2",
                         "--head-dim", "32", "--causal", "--iters", "2", "--json", "out/demo_attention.json"])
    bench_attention.run(args)
    print("  (errors vs a float64 single-device reference; bytes counted by the comm layer vs the closed-form\n"
          "   model; imbalance = counted critical-path pairs / ideal; times are per rank on a 2-core CPU)")
    print("\n== 3. Llama-style model, context parallel on 4 ranks vs one device (float64) ==")
    for strategy in ("zigzag", "ulysses"):
        res = run(model_equivalence, 4, args=(strategy,), timeout=300)
        el = max(r[0] for r in res)
        eg = max(r[1] for r in res)
        print(f"  {strategy:<8} layout={res[0][2]:<10} max |logits - single| = {el:.2e}   "
              f"max |param grad - single| = {eg:.2e}")
    print(f"\ndemo finished in {time.time() - t0:.1f}s; JSON records in out/demo_attention.json")
    return 0


"""`longctx bench decode`: tree vs ring decoding over a sequence-sharded KV cache (docs/algorithms.md §9).

For each context length, every rank fills a round-robin ShardedKVCache with the same prompt K/V and decodes
the same new query with each strategy. Bytes come from the comm counters (max over ranks) next to the
closed-form models; latency is the median over iterations measured inside the ranks (slowest rank); the
error is against single-device float64 attention over the whole cache. Tree's bytes do not depend on the
context, ring's grow with it: pass two contexts (`--context 4096,16384`) to see it.
"""

from __future__ import annotations

import statistics
import time

import torch

from .._argtypes import int_list, seconds, seed, split_names
from . import report

COLUMNS = ["strategy", "world_size", "context", "batch", "max_abs_err", "comm_bytes_measured", "comm_bytes_model",
           "comm_calls", "latency_ms"]
STRATEGIES = ("tree", "ring")


def add_arguments(p) -> None:
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--context", type=int_list, default=[4096, 16384], help="comma-separated cached lengths")
    p.add_argument("--strategies", default="tree,ring")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=1, help="query tokens decoded per step (Sq)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", choices=sorted(report.DTYPES), default="float32")
    p.add_argument("--kernel", default="auto", help="local kernel backend")
    p.add_argument("--collectives", type=int, choices=(1, 2), default=None,
                   help="tree combine: 2 (default) = all-reduce max + fused all-reduce sum, 1 = all-gather + local "
                        "merge")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--backend", default="auto", help="process group backend: auto, gloo, nccl")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--timeout", type=seconds, default=1800.0,
                   help="seconds each launch of the simulated ranks may take (default 1800)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: bytes per decode step vs context, per strategy")


def _problem(cfg, context):
    g = torch.Generator().manual_seed(cfg["seed"] + context)
    b, hkv, d = cfg["batch"], cfg["kv_heads"], cfg["head_dim"]
    k = torch.randn(b, context, hkv, d, generator=g, dtype=torch.float64)
    v = torch.randn(b, context, hkv, d, generator=g, dtype=torch.float64)
    q = torch.randn(b, cfg["new_tokens"], cfg["heads"], d, generator=g, dtype=torch.float64)
    return q, k, v


def _rank_main(cfg):
    """Runs on every rank: per context, fill the cache, then each strategy once for the counters and the
    error, then timed iterations."""
    import torch.distributed as dist

    from ..kernels import forward
    from ..parallel.comm import Comm
    from ..parallel.sequence.tree import ShardedKVCache, ring_decode_comm_model, tree_comm_model

    comm = Comm.get(None)
    dev, sync = report.rank_device()
    dtype = cfg["dtype"]

    out = []
    for context in cfg["contexts"]:
        q64, k64, v64 = _problem(cfg, context)
        ref, _ = forward(q64, k64, v64, backend="reference")
        cache = ShardedKVCache()
        cache.prefill(k64.to(dev, dtype), v64.to(dev, dtype))
        q = q64.to(dev, dtype)
        del k64, v64
        for s in cfg["strategies"]:
            kw = {"collectives": cfg["collectives"]} if s == "tree" else {}
            comm.stats.reset()
            o = cache.decode(q, strategy=s, kernel=cfg["kernel"], **kw)
            nbytes, calls = comm.stats.bytes("decode"), comm.stats.calls("decode")
            err = (o.double().cpu() - ref).abs().max().item()
            times = []
            for i in range(cfg["warmup"] + cfg["iters"]):
                sync()
                t0 = time.perf_counter()
                cache.decode(q, strategy=s, kernel=cfg["kernel"], **kw)
                report.sync_device(dev)
                if i >= cfg["warmup"]:
                    times.append(1e3 * (time.perf_counter() - t0))
            e = torch.tensor([], dtype=dtype).element_size()
            if s == "tree":
                model = tree_comm_model(comm.world, cfg["batch"], cfg["new_tokens"], cfg["heads"],
                                        cfg["head_dim"], e, collectives=cfg["collectives"])
            else:
                model = ring_decode_comm_model(comm.world, cfg["batch"], max(cache.shard_lengths()),
                                               cfg["kv_heads"], cfg["head_dim"], e)
            out.append(dict(strategy=s, context=context, max_abs_err=err, comm_bytes_measured=nbytes,
                            comm_calls=calls, comm_bytes_model=model["fwd_bytes"],
                            latency_ms=statistics.median(times)))
        dist.barrier()
    return out


def validate(args) -> None:
    report.check_args(args)
    strategies = split_names(args.strategies, "--strategies")
    bad = [s for s in strategies if s not in STRATEGIES]
    if bad:
        raise ValueError(f"unknown decode strategies {bad}; choose from {list(STRATEGIES)}")
    if args.collectives is not None and "tree" not in strategies:
        raise ValueError(f"--collectives applies to the tree strategy, which --strategies {args.strategies!r} leaves "
                         "out; add tree, or drop --collectives")


def run(args) -> list[dict]:
    from ..launch import run as launch

    validate(args)
    strategies = split_names(args.strategies, "--strategies")
    kv = args.kv_heads or args.heads
    cfg = dict(contexts=list(args.context), strategies=strategies, batch=args.batch, new_tokens=args.new_tokens,
               heads=args.heads, kv_heads=kv, head_dim=args.head_dim, dtype=report.DTYPES[args.dtype],
               kernel=args.kernel, collectives=args.collectives or 2, iters=args.iters, warmup=args.warmup,
               seed=args.seed)
    per_rank = launch(_rank_main, args.world_size, args=(cfg,), backend=args.backend, timeout=args.timeout)
    records = []
    for i, first in enumerate(per_rank[0]):
        rows = [r[i] for r in per_rank]
        records.append(dict(
            strategy=first["strategy"], world_size=args.world_size, context=first["context"], batch=args.batch,
            new_tokens=args.new_tokens, heads=args.heads, kv_heads=kv, head_dim=args.head_dim, dtype=args.dtype,
            max_abs_err=max(r["max_abs_err"] for r in rows),
            comm_bytes_measured=max(r["comm_bytes_measured"] for r in rows),
            comm_bytes_model=first["comm_bytes_model"], comm_calls=max(r["comm_calls"] for r in rows),
            latency_ms=max(r["latency_ms"] for r in rows)))
    print(f"decode benchmark: {args.world_size} ranks, batch {args.batch}, {args.new_tokens} new token(s), heads "
          f"{args.heads}/{kv}, head_dim {args.head_dim}, {args.dtype} (bytes: per rank per decode step)")
    print(report.table(records, COLUMNS))
    report.write_json(args.json, records, meta=report.environment())
    series = {s: ([r["context"] for r in records if r["strategy"] == s],
                  [r["comm_bytes_measured"] for r in records if r["strategy"] == s]) for s in strategies}
    report.plot_lines(args.plot, series, xlabel="context length", ylabel="bytes sent per rank per step",
                      title=f"decode over {args.world_size} ranks", logx=True)
    return records

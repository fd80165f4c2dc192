"""`longctx bench attention`: sequence-parallel strategies on a simulated (or real) cluster.

Every strategy runs on the same global problem; each rank returns its output and gradient shards, the
parent reassembles them and compares with a float64 single-device reference. Bytes and work come from
the comm layer's counters and the closed-form models, times from the ranks (median over iterations,
slowest rank), and the single-device baseline runs through the same harness on one rank.
"""

from __future__ import annotations

import statistics
import time

import torch

from .._argtypes import seconds, split_names
from ..parallel.sequence.ulysses import HeadNames
from . import report

COLUMNS = ["strategy", "layout", "world_size", "max_abs_err_out", "max_abs_err_grad", "comm_bytes_measured",
           "comm_bytes_model", "imbalance_counted", "fwd_ms", "bwd_ms", "single_device_fwd_ms", "single_device_bwd_ms"]


def add_arguments(p) -> None:
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window W: each query sees the W-1 keys before it and itself, and without "
                        "--causal also the W-1 after it")
    p.add_argument("--dtype", choices=sorted(report.DTYPES), default="float32")
    p.add_argument("--strategies", default="ring,zigzag,striped,allgather,ulysses,hybrid")
    p.add_argument("--kernel", default="auto", help="local kernel backend: auto or one `longctx info` lists")
    p.add_argument("--ulysses", type=int, default=None, help="hybrid: ulysses degree (default 2 when it divides)")
    p.add_argument("--hybrid-layout", default=None, help="hybrid: layout of the ring part (default zigzag)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--backend", default="auto", help="process group backend: auto, gloo, nccl")
    p.add_argument("--no-check", action="store_true", help="skip the float64 reference (large problems)")
    p.add_argument("--timeout", type=seconds, default=1800.0,
                   help="seconds each launch of the simulated ranks may take (default 1800)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: fwd+bwd time and bytes per strategy")


def _problem(cfg):
    g = torch.Generator().manual_seed(cfg["seed"])
    shape_q = (cfg["batch"], cfg["seq_len"], cfg["heads"], cfg["head_dim"])
    shape_k = (cfg["batch"], cfg["seq_len"], cfg["kv_heads"], cfg["head_dim"])
    q, do = torch.randn(shape_q, generator=g), torch.randn(shape_q, generator=g)
    k, v = torch.randn(shape_k, generator=g), torch.randn(shape_k, generator=g)
    return [t.to(cfg["dtype"]) for t in (q, k, v, do)]


def _mask(cfg):
    from ..kernels import Mask

    return Mask.from_flags(cfg["causal"], cfg["window"])


def _timed(fn, cfg, sync):
    times = []
    for i in range(cfg["warmup"] + cfg["iters"]):
        sync()
        t0 = time.perf_counter()
        res = fn()
        sync()
        if i >= cfg["warmup"]:
            times.append(1e3 * (time.perf_counter() - t0))
    return res, statistics.median(times)


def _rank_main(cfg, strategies):
    """Runs on every rank: each strategy once for the counters, then timed iterations."""
    import torch.distributed as dist

    from ..parallel import Comm, attention, context_mesh, hybrid_positions, positions, strategy_layout
    from ..parallel.sequence.mesh import hybrid_groups

    dev, sync = report.rank_device()
    world, rank = dist.get_world_size(), dist.get_rank()
    q, k, v, do = (t.to(dev) for t in _problem(cfg))

    out = []
    for s in strategies:
        group, comms = None, [Comm.get(None)]
        if s == "hybrid":
            u = cfg["ulysses"]
            group = context_mesh(world // u, u)
            ug, rg, _ = hybrid_groups(group)
            comms = list({id(c): c for c in (Comm.get(ug), Comm.get(rg))}.values())
            layout = cfg["hybrid_layout"]
            pos = hybrid_positions(layout, cfg["seq_len"], world // u, u, Comm.get(rg).rank, Comm.get(ug).rank)
        else:
            layout = strategy_layout(s)
            pos = positions(layout, cfg["seq_len"], world, rank)
        local = [t[:, pos.to(dev)].contiguous() for t in (q, k, v, do)]

        def step(local=local, group=group, layout=layout, s=s):
            ql, kl, vl = (t.detach().requires_grad_() for t in local[:3])
            o = attention(ql, kl, vl, causal=cfg["causal"], strategy=s, group=group, kernel=cfg["kernel"],
                          window=cfg["window"], layout=layout)
            return ql, kl, vl, o

        for c in comms:
            c.stats.reset()
        ql, kl, vl, o = step()
        fwd_bytes = sum(c.stats.bytes("fwd") for c in comms)
        o.backward(local[3])
        nbytes = fwd_bytes + sum(c.stats.bytes("bwd") for c in comms)
        pairs = [(ph, st, p) for c in comms for (ph, st), p in sorted(c.stats.work.items())]
        (ql2, kl2, vl2, o2), fwd_ms = _timed(step, cfg, sync)
        _, bwd_ms = _timed(lambda o2=o2, g=local[3]: o2.backward(g, retain_graph=True), cfg, sync)
        out.append({"strategy": s, "layout": layout, "positions": pos, "out": o.detach().cpu(),
                    "grads": [t.grad.cpu() for t in (ql, kl, vl)], "bytes": nbytes, "fwd_bytes": fwd_bytes,
                    "work": pairs, "fwd_ms": fwd_ms, "bwd_ms": bwd_ms})
    return out


def _single_device(cfg):
    """The same problem on one rank with the local kernel: the baseline the strategies are judged by."""
    from ..kernels import attention as local_attention

    dev, sync = report.rank_device(barrier=False)
    q, k, v, do = (t.to(dev) for t in _problem(cfg))
    mask = _mask(cfg)

    def fwd():
        ql, kl, vl = (t.detach().requires_grad_() for t in (q, k, v))
        return local_attention(ql, kl, vl, mask=mask, backend=cfg["kernel"])

    o, fwd_ms = _timed(fwd, cfg, sync)
    _, bwd_ms = _timed(lambda: o.backward(do, retain_graph=True), cfg, sync)
    return fwd_ms, bwd_ms


def counted_imbalance(rows: list[dict]) -> float:
    """Critical path over an even split, from the forward pairs every rank recorded at every schedule step
    as it ran its kernel calls (CommStats.work), not from the planner's model."""
    from ..parallel.sequence.plan import imbalance

    steps = sorted({st for r in rows for ph, st, _ in r["work"] if ph == "fwd"})
    if not steps:
        return 1.0
    table = [[0] * len(rows) for _ in steps]
    for rank, r in enumerate(rows):
        for ph, st, pairs in r["work"]:
            if ph == "fwd":
                table[steps.index(st)][rank] += pairs
    return imbalance(table)


def _reference(cfg):
    from .. import kernels

    q, k, v, do = (t.double() for t in _problem(cfg))
    mask = _mask(cfg)
    o, lse = kernels.forward(q, k, v, mask=mask, backend="reference")
    return o, kernels.backward(do, q, k, v, o, lse, mask=mask, backend="reference")


def _ulysses(args) -> int:
    return args.ulysses or (2 if args.world_size % 2 == 0 and args.heads % 2 == 0 else 1)


_HEAD_NAMES = HeadNames(heads="--heads", kv_heads="--kv-heads", ranks="a --world-size",
                        hybrid_degree="a --ulysses degree")


def _hybrid_layout(args) -> str:
    return args.hybrid_layout or "zigzag"  # None when not given: given with no hybrid strategy is refused


def validate(args) -> None:
    """Every strategy's constraints for these arguments, checked before any rank starts."""
    from ..parallel import get_strategy
    from ..parallel.sequence import LAYOUTS

    report.check_args(args)
    names = split_names(args.strategies, "--strategies")
    given = [flag for flag, value, default in (("--ulysses", args.ulysses, None),
                                               ("--hybrid-layout", args.hybrid_layout, None)) if value != default]
    if given and "hybrid" not in names:
        raise ValueError(f"{given[0]} applies to the hybrid strategy, which --strategies {args.strategies!r} leaves "
                         f"out; add hybrid, or drop {given[0]}")
    if args.hybrid_layout is not None and args.hybrid_layout not in LAYOUTS:
        raise ValueError(f"--hybrid-layout {args.hybrid_layout!r}: choose one of {', '.join(LAYOUTS)}")
    for name in names:
        strat = get_strategy(name)
        hybrid = name == "hybrid"
        layout = strat.layout(_hybrid_layout(args) if hybrid else None)
        strat.check(seq_len=args.seq_len, world=args.world_size, layout=layout, heads=args.heads,
                    kv_heads=args.kv_heads or args.heads, ulysses=_ulysses(args) if hybrid else 1,
                    what=f"--seq-len ({name})", head_names=_HEAD_NAMES)


def run(args) -> list[dict]:
    from ..launch import run as launch
    from ..parallel import comm_model, work_model

    strategies = split_names(args.strategies, "--strategies")
    w = args.world_size
    uly = _ulysses(args)
    cfg = dict(seq_len=args.seq_len, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads or args.heads,
               head_dim=args.head_dim, causal=args.causal, window=args.window, dtype=report.DTYPES[args.dtype],
               kernel=args.kernel, ulysses=uly, hybrid_layout=_hybrid_layout(args), iters=args.iters,
               warmup=args.warmup, seed=0)
    print(f"bench attention: {strategies} on {w} simulated ranks, seq {args.seq_len}, heads {args.heads}/"
          f"{cfg['kv_heads']}, dim {args.head_dim}, {args.dtype}, causal={args.causal}, window={args.window}",
          flush=True)
    per_rank = launch(_rank_main, w, args=(cfg, strategies), backend=args.backend, timeout=args.timeout)
    (sd_fwd, sd_bwd), = launch(_single_device, 1, args=(cfg,), backend=args.backend, timeout=args.timeout)
    ref = None if args.no_check else _reference(cfg)
    ebytes = torch.tensor([], dtype=cfg["dtype"]).element_size()
    records = []
    for i, s in enumerate(strategies):
        rows = [r[i] for r in per_rank]
        layout = rows[0]["layout"]
        err_out = err_grad = None
        if ref is not None:
            err_out = max((r["out"].double() - ref[0][:, r["positions"]]).abs().max().item() for r in rows)
            err_grad = max((g.double() - rg[:, r["positions"]]).abs().max().item()
                           for r in rows for g, rg in zip(r["grads"], ref[1]))
        model = comm_model(s, world=w, batch=args.batch, seq_len=args.seq_len, heads=args.heads,
                           kv_heads=cfg["kv_heads"], head_dim=args.head_dim, dtype_bytes=ebytes,
                           layout=layout, ulysses=uly if s == "hybrid" else None)
        work = work_model(s, world=w, seq_len=args.seq_len, causal=args.causal, window=args.window, layout=layout,
                          ulysses=uly if s == "hybrid" else None)
        records.append({
            "strategy": s, "layout": layout, "world_size": w, "seq_len": args.seq_len, "batch": args.batch,
            "heads": args.heads, "kv_heads": cfg["kv_heads"], "head_dim": args.head_dim, "causal": args.causal,
            "window": args.window, "dtype": args.dtype, "kernel": args.kernel,
            "ulysses": uly if s == "hybrid" else None,
            "max_abs_err_out": err_out, "max_abs_err_grad": err_grad,
            "comm_bytes_measured": max(r["bytes"] for r in rows),
            "comm_bytes_model": model["fwd_bytes"] + model["bwd_bytes"],
            "imbalance_counted": round(counted_imbalance(rows), 4),
            "imbalance_model": round(work["imbalance"], 4),
            "fwd_ms": max(r["fwd_ms"] for r in rows), "bwd_ms": max(r["bwd_ms"] for r in rows),
            "single_device_fwd_ms": sd_fwd, "single_device_bwd_ms": sd_bwd,
        })
    print(report.table(records, COLUMNS))
    report.write_json(args.json, records, meta=report.environment())
    if args.plot:
        report.plot_bars(args.plot, [r["strategy"] for r in records],
                         {"fwd+bwd ms": [r["fwd_ms"] + r["bwd_ms"] for r in records],
                          "MiB sent": [r["comm_bytes_measured"] / 2**20 for r in records]},
                         title=f"W={w} N={args.seq_len} causal={args.causal}")
    return records

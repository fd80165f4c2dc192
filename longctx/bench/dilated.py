"""`longctx bench dilated`: LongNet dilated attention over a contiguous sequence split (docs/algorithms.md §10).

Each rank draws its own chunk of q, k, v, dout (seeded by rank, so no rank ever holds the whole sequence)
and runs forward + backward. Bytes come from the comm counters of the context group and its segment
sub-groups (max over ranks, forward + backward) next to dilated_comm_model; times are medians inside the
ranks (slowest rank); peak memory is per rank (ru_maxrss on CPU, which includes the interpreter,
max_memory_allocated on GPU), the max over ranks. Unless --no-check (or the sequence is longer than
--check-max-len), the parent rebuilds the whole problem and compares outputs and gradients with
single-device dilated attention in float64.
"""

from __future__ import annotations

import resource
import statistics
import time

import torch

from .._argtypes import int_list, seconds, seed
from . import report

CHECK_MAX_LEN = 131072  # the float64 single-device check rebuilds the whole problem: skipped above this
COLUMNS = ["world_size", "seq_len", "causal", "max_abs_err_out", "max_abs_err_grad", "comm_bytes_measured",
           "comm_bytes_model", "peak_mem_bytes", "fwd_ms", "bwd_ms"]


def add_arguments(p) -> None:
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=16384)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=None, help="default: --heads (MHA)")
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--segment-lengths", type=int_list, default=[1024, 4096, 16384])
    p.add_argument("--dilation-rates", type=int_list, default=[1, 4, 16])
    p.add_argument("--causal", action="store_true")
    p.add_argument("--dtype", choices=sorted(report.DTYPES), default="float32")
    p.add_argument("--kernel", default="auto", help="local kernel backend")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-check", action="store_true", help="skip the float64 single-device comparison")
    p.add_argument("--check-max-len", type=int, default=None,
                   help=f"skip the check above this length (default {CHECK_MAX_LEN})")
    p.add_argument("--backend", default="auto", help="process group backend: auto, gloo, nccl")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--timeout", type=seconds, default=3600.0,
                   help="seconds each launch of the simulated ranks may take (default 3600)")
    p.add_argument("--json", default=None)


def _chunk(cfg, rank):
    """Rank `rank`'s contiguous chunk of q, k, v, dout (fp32 draws, so every dtype sees the same numbers)."""
    g = torch.Generator().manual_seed((cfg["seed"] * 100003 + rank) % 2**63)
    b, l, h, hkv, d = cfg["batch"], cfg["seq_len"] // cfg["world"], cfg["heads"], cfg["kv_heads"], cfg["head_dim"]
    shapes = [(b, l, h, d), (b, l, hkv, d), (b, l, hkv, d), (b, l, h, d)]
    return [torch.randn(*s, generator=g) for s in shapes]


def _peak_mem(dev) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _rank_main(cfg):
    import torch.distributed as dist

    from ..parallel.sequence.dilated import dilated_attention
    from ..parallel.sequence.dilated_dist import dilated_comms

    rank = dist.get_rank()
    dev, sync = report.rank_device()
    dtype = cfg["dtype"]
    q, k, v, do = (t.to(dev, dtype) for t in _chunk(cfg, rank))

    fwd_t, bwd_t, nbytes = [], [], None
    for i in range(cfg["warmup"] + cfg["iters"]):
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        for c in dilated_comms(None):
            c.stats.reset()
        sync()
        t0 = time.perf_counter()
        out = dilated_attention(*leaves, segment_lengths=cfg["ws"], dilation_rates=cfg["rs"], causal=cfg["causal"],
                                kernel=cfg["kernel"])
        sync()
        t1 = time.perf_counter()
        out.backward(do)
        sync()
        t2 = time.perf_counter()
        if nbytes is None:
            comms = dilated_comms(None)
            nbytes = {ph: sum(c.stats.bytes(ph) for c in comms) for ph in ("fwd", "bwd")}
        if i >= cfg["warmup"]:
            fwd_t.append(1e3 * (t1 - t0))
            bwd_t.append(1e3 * (t2 - t1))
    res = dict(fwd_ms=statistics.median(fwd_t), bwd_ms=statistics.median(bwd_t), peak_mem_bytes=_peak_mem(dev),
               fwd_bytes=nbytes["fwd"], bwd_bytes=nbytes["bwd"])
    if cfg["check"]:
        res["shards"] = [x.detach().cpu() for x in (out, *(t.grad for t in leaves))]
    return res


def _check(cfg, per_rank):
    """Max |distributed - single-device float64| over outputs and gradients (whole sequence)."""
    from ..parallel.sequence.dilated import LOCAL, dilated_attention

    chunks = [_chunk(cfg, r) for r in range(cfg["world"])]
    q, k, v, do = (torch.cat([c[i] for c in chunks], dim=1).double() for i in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out = dilated_attention(*leaves, segment_lengths=cfg["ws"], dilation_rates=cfg["rs"], causal=cfg["causal"],
                            group=LOCAL)
    out.backward(do)
    got = [torch.cat([r["shards"][i] for r in per_rank], dim=1).double() for i in range(4)]
    err_out = (got[0] - out.detach()).abs().max().item()
    err_grad = max((g - t.grad).abs().max().item() for g, t in zip(got[1:], leaves))
    return err_out, err_grad


def validate(args) -> None:
    from ..parallel.sequence.dilated import check_pattern

    report.check_args(args)
    if args.no_check and args.check_max_len is not None:
        raise ValueError("--check-max-len applies to the float64 check, which --no-check turns off; drop one of them")
    try:
        check_pattern(args.segment_lengths, args.dilation_rates, args.seq_len, args.world_size)
    except ValueError as e:
        raise ValueError(f"bad dilated pattern: {e}") from None


def run(args) -> list[dict]:
    from ..launch import run as launch
    from ..parallel.sequence.dilated import dilated_comm_model

    validate(args)
    kv = args.kv_heads or args.heads
    limit = CHECK_MAX_LEN if args.check_max_len is None else args.check_max_len  # 0: skipped at every length
    check = not args.no_check and args.seq_len <= limit
    cfg = dict(world=args.world_size, seq_len=args.seq_len, batch=args.batch, heads=args.heads, kv_heads=kv,
               head_dim=args.head_dim, ws=list(args.segment_lengths), rs=list(args.dilation_rates),
               causal=bool(args.causal), dtype=report.DTYPES[args.dtype], kernel=args.kernel, iters=max(1, args.iters),
               warmup=args.warmup, seed=args.seed, check=check)
    t0 = time.perf_counter()
    per_rank = launch(_rank_main, args.world_size, args=(cfg,), backend=args.backend, timeout=args.timeout)
    wall = time.perf_counter() - t0
    err_out, err_grad = _check(cfg, per_rank) if check else (None, None)
    e = torch.tensor([], dtype=report.DTYPES[args.dtype]).element_size()
    model = dilated_comm_model(args.world_size, args.batch, args.seq_len, args.heads, args.head_dim, e,
                               args.segment_lengths, args.dilation_rates, kv_heads=kv)
    rec = dict(world_size=args.world_size, seq_len=args.seq_len, batch=args.batch, heads=args.heads, kv_heads=kv,
               head_dim=args.head_dim, dtype=args.dtype, causal=bool(args.causal),
               segment_lengths=list(args.segment_lengths), dilation_rates=list(args.dilation_rates),
               max_abs_err_out=err_out, max_abs_err_grad=err_grad,
               comm_bytes_measured=max(r["fwd_bytes"] + r["bwd_bytes"] for r in per_rank),
               comm_bytes_model=model["fwd_bytes"] + model["bwd_bytes"],
               comm_fwd_bytes_measured=max(r["fwd_bytes"] for r in per_rank), comm_fwd_bytes_model=model["fwd_bytes"],
               peak_mem_bytes=max(r["peak_mem_bytes"] for r in per_rank),
               peak_mem_bytes_per_rank=[r["peak_mem_bytes"] for r in per_rank],
               fwd_ms=max(r["fwd_ms"] for r in per_rank), bwd_ms=max(r["bwd_ms"] for r in per_rank),
               wall_s=wall)
    print(f"dilated attention: {args.world_size} ranks, N={args.seq_len}, batch {args.batch}, heads {args.heads}/{kv}, "
          f"head_dim {args.head_dim}, {args.dtype}, w={args.segment_lengths}, r={args.dilation_rates}"
          f"{', causal' if args.causal else ''} (bytes per rank, fwd+bwd; peak memory per rank)")
    print(report.table([rec], COLUMNS))
    report.write_json(args.json, [rec], meta=report.environment())
    return [rec]

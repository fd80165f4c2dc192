"""`longctx bench kernel`: local kernel backends side by side, fwd / bwd / fwd+bwd time and TFLOP/s.

FLOPs count only the pairs the mask allows (Mask.count_pairs): fwd = 4*H*D*pairs (two matmuls),
bwd = 2.5x fwd (five matmuls, as FlashAttention-2 counts it), so a causal kernel that skips masked tiles
is not credited for work it never did. Backends that are missing or cannot run the call are reported as
skipped with the reason. Timings use CUDA events on GPU and perf_counter (after warmup) on CPU.

`--virtual-ranks P --schedule zigzag` also runs, on this one device, every kernel call the P ranks of a
ring schedule would make (longctx.parallel.sequence.plan's block tables, partials merged exactly), and reports its
time against one full-sequence call of the same backend: the price of cutting attention into blocks.

`--softcap C` caps every score (Gemma 2: C tanh(s / C)): the price of the cap in the backends that compute
it (torch's SDPA and its baselines cannot, and are skipped with that reason).
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings

import torch

from .. import kernels
from .._argtypes import int_list, seed, split_names
from ..kernels import Mask, backends, empty_state, merge_
from ..kernels import sdpa as sdpa_mod
from ..kernels.registry import missing_capability
from . import report, sdpa_baselines

COLUMNS = ["backend", "seq_len", "fwd_ms", "bwd_ms", "fwdbwd_ms", "fwd_tflops", "bwd_tflops", "fwdbwd_tflops",
           "peak_mem_mib", "max_abs_err_out", "status"]
VR_COLUMNS = ["backend", "seq_len", "virtual_ranks", "schedule", "virtual_calls", "fwdbwd_ms",
              "virtual_fwdbwd_ms", "virtual_ratio", "virtual_max_abs_err_out"]
SCHEDULES = {"ring": "contiguous", "contiguous": "contiguous", "zigzag": "zigzag", "striped": "striped"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backends", default="triton,sdpa,flash,reference", help="comma-separated backend names")
    p.add_argument("--seq-lens", type=int_list, default=[1024, 4096, 16384], help="comma-separated lengths")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--v-head-dim", type=int, default=None,
                   help="values of another width (latent attention, e.g. 192/128; default: --head-dim); "
                        "a backend of one width (sdpa, flash) gets the narrower side zero-padded, as in training")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="GQA: K/V heads (default: --heads)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--window", type=int, default=None,
                   help="sliding window W: each query sees the W-1 keys before it and itself, and without "
                        "--causal also the W-1 after it")
    p.add_argument("--softcap", type=float, default=None,
                   help="logit soft-capping (Gemma 2): scores become C tanh(s / C); backends that cannot cap "
                        "are skipped")
    p.add_argument("--dtype", choices=sorted(report.DTYPES), default="bfloat16")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--warmup", type=int, default=None, help="default: 3 on CUDA, 1 on CPU")
    p.add_argument("--iters", type=int, default=None, help="default: 10 on CUDA, 3 on CPU")
    p.add_argument("--check-len", type=int, default=512,
                   help="length of the accuracy check against 'reference' (0: skip)")
    p.add_argument("--virtual-ranks", type=int, default=0,
                   help="also run a P-rank schedule's block calls on this device and compare to one call")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default=None,
                   help="the layout --virtual-ranks splits by (default zigzag)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--json", default=None, help="write the records here")
    p.add_argument("--plot", default=None, help="PNG of fwd+bwd TFLOP/s vs sequence length")


def _schedule(args) -> str:
    return args.schedule or "zigzag"  # None when not given: given without --virtual-ranks is refused


def _mask(args) -> Mask:
    return Mask.from_flags(args.causal, args.window)


def _time_ms(fn, device: torch.device, warmup: int, iters: int, min_s: float = 0.2) -> float:
    for _ in range(warmup):
        fn()
    report.sync_device(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / iters
    n, t0 = 0, time.perf_counter()
    # CPU clocks are coarse next to short calls: keep going until the total is long enough to trust.
    while n < iters or (time.perf_counter() - t0 < min_s and n < 100 * iters):
        fn()
        n += 1
    return (time.perf_counter() - t0) * 1e3 / n


def _tensors(b, s, h, hkv, d, dtype, device, seed, dv=None):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype)  # noqa: E731
    dv = d if dv is None else dv
    return mk(b, s, h, d), mk(b, s, hkv, d), mk(b, s, hkv, dv), mk(b, s, h, dv)


def _kernel(name: str, v_wide: bool, softcap=None):
    """(forward, backward) of a backend: its own functions, or for values of another width or a cap the
    registry's dispatch (which pads for a backend of one width, as training runs it)."""
    if not v_wide and softcap is None:
        be = backends()[name]
        return be.forward, be.backward
    return (lambda *a, **kw: kernels.forward(*a, backend=name, softcap=softcap, **kw),
            lambda *a, **kw: kernels.backward(*a, backend=name, softcap=softcap, **kw))


def _why_not(name: str, q, k, v, mask, softcap=None) -> str | None:
    if name in sdpa_baselines.NAMES:
        return "torch's SDPA has no logit soft-capping" if softcap else sdpa_baselines.why_not(name, q, mask)
    be = backends()[name]  # validate() refused names that are no backend
    return missing_capability(be, softcap) or be.availability() or be.supports(q, k, v, mask)


def _closures(name, q, k, v, do, mask, softcap=None):
    """(fwd, bwd, fwdbwd, out) of a longctx backend or a torch baseline, for the timing loop."""
    if name in sdpa_baselines.NAMES:
        return sdpa_baselines.closures(name, q, k, v, do, mask)
    (forward, backward), scale = _kernel(name, v.shape[-1] != q.shape[-1], softcap), q.shape[-1] ** -0.5
    out, lse = forward(q, k, v, scale=scale, mask=mask)

    def fwdbwd():
        o, lse_ = forward(q, k, v, scale=scale, mask=mask)
        return backward(do, q, k, v, o, lse_, scale=scale, mask=mask)

    return (lambda: forward(q, k, v, scale=scale, mask=mask),
            lambda: backward(do, q, k, v, out, lse, scale=scale, mask=mask), fwdbwd, out)


def _tflops(flops: float, ms: float | None) -> float | None:
    return None if not ms else flops / (ms * 1e-3) / 1e12


def _check_error(name, args, dtype, device, mask) -> float | None:
    """Max |out - reference(out in fp32 math)| at a short length: catches a fast but wrong backend."""
    s = min(args.check_len, max(args.seq_lens))
    if s <= 0:
        return None
    q, k, v, _ = _tensors(args.batch, s, args.heads, args.kv_heads, args.head_dim, dtype, device,
                          args.seed + 1, args.v_head_dim)
    if _why_not(name, q, k, v, mask, args.softcap):
        return None
    scale = args.head_dim ** -0.5
    out = _closures(name, q, k, v, q, mask, args.softcap)[3]
    up = torch.float64 if dtype == torch.float64 else torch.float32
    cap = {} if args.softcap is None else {"softcap": args.softcap}
    ref, _ = backends()["reference"].forward(q.to(up), k.to(up), v.to(up), scale=scale, mask=mask, **cap)
    return (out.to(up) - ref).abs().max().item()


def _bench_one(name, args, s, dtype, device, mask, warmup, iters) -> dict:
    b, h, hkv, d = args.batch, args.heads, args.kv_heads, args.head_dim
    dv = args.v_head_dim or d
    rec = dict(backend=name, seq_len=s, head_dim=d, v_head_dim=dv, heads=h, kv_heads=hkv, batch=b,
               causal=bool(args.causal), window=args.window, softcap=args.softcap, dtype=args.dtype,
               device=str(device), fwd_ms=None, bwd_ms=None, fwdbwd_ms=None, fwd_tflops=None, bwd_tflops=None,
               fwdbwd_tflops=None, peak_mem_mib=None, max_abs_err_out=None)
    q, k, v, do = _tensors(b, s, h, hkv, d, dtype, device, args.seed, dv)
    why = _why_not(name, q, k, v, mask, args.softcap)
    if why:
        return dict(rec, status=f"skipped: {why}")
    fallbacks = dict(sdpa_mod.fallbacks)
    baseline = name in sdpa_baselines.NAMES
    caught: list = []
    try:
        # torch says why a pinned SDPA backend cannot take a call only in warnings, then raises "No available
        # kernel": the warnings are the reason the row is skipped with
        with warnings.catch_warnings(record=True) if baseline else contextlib.nullcontext(caught) as caught:
            if baseline:
                warnings.simplefilter("always")
            fwd, bwd, fwdbwd, _ = _closures(name, q, k, v, do, mask, args.softcap)
        rec["fwd_ms"] = _time_ms(fwd, device, warmup, iters)
        rec["bwd_ms"] = _time_ms(bwd, device, warmup, iters)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        rec["fwdbwd_ms"] = _time_ms(fwdbwd, device, warmup, iters)
        if device.type == "cuda":
            rec["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        rec["max_abs_err_out"] = _check_error(name, args, dtype, device, mask)
        if args.virtual_ranks and name not in sdpa_baselines.NAMES:  # baselines give no lse to merge
            rec.update(run_virtual_ranks(name, args, s, dtype, device, mask, warmup, iters, rec["fwdbwd_ms"]))
    except Exception as e:  # noqa: BLE001 - one failing backend (OOM, compile error) must not end the run
        first = str(e).splitlines()[0][:200] if str(e) else ""
        if baseline and "No available kernel" in str(e):
            reasons = dict.fromkeys(str(w.message).strip().splitlines()[0] for w in caught if str(w.message).strip())
            return dict(rec, status=f"skipped: torch cannot run {name} here: {'; '.join(reasons) or first}")
        return dict(rec, status=f"error: {type(e).__name__}: {first}")
    flops = 2.0 * h * (d + dv) * mask.count_pairs(s, s, batch=b)  # QK^T over d, PV over dv
    rec.update(fwd_tflops=_tflops(flops, rec["fwd_ms"]), bwd_tflops=_tflops(2.5 * flops, rec["bwd_ms"]),
               fwdbwd_tflops=_tflops(3.5 * flops, rec["fwdbwd_ms"]))
    new = {k: n - fallbacks.get(k, 0) for k, n in sdpa_mod.fallbacks.items() if n > fallbacks.get(k, 0)}
    # only the sdpa family (sdpa, cudnn) counts fallbacks, and only this backend ran since `fallbacks`
    rec["status"] = f"ok (fell back to reference: {new})" if new else "ok"
    return rec


def run_virtual_ranks(name, args, s, dtype, device, mask, warmup, iters, full_ms) -> dict:
    """All kernel calls of a P-rank ring schedule (plan.step_blocks), run on one device, vs one full call."""
    from ..parallel.sequence import layouts, plan

    p, layout = args.virtual_ranks, SCHEDULES[_schedule(args)]
    if mask.has_documents or (mask.left is not None and mask.right not in (0, mask.left)):
        raise ValueError("virtual ranks support full, causal and sliding-window masks (what plan.py plans)")
    causal = mask.right == 0
    window = None if mask.left is None else mask.left + 1
    layouts.check_seq(layout, s, p)
    b, h, d = args.batch, args.heads, args.head_dim
    q, k, v, do = _tensors(b, s, h, args.kv_heads, d, dtype, device, args.seed, args.v_head_dim)
    (forward, backward), scale = _kernel(name, v.shape[-1] != d, args.softcap), d ** -0.5
    pos = [layouts.positions(layout, s, p, r).to(device) for r in range(p)]
    qs, ks, vs, dos = ([x.index_select(1, i) for i in pos] for x in (q, k, v, do))
    srcs = [[plan.ring_src(r, st, p) for st in range(p)] for r in range(p)]
    table = [[(src, plan.step_blocks(layout, s, p, r, src, causal, window)) for src in srcs[r]]
             for r in range(p)]
    c = s // p

    def forward_all():
        outs = []
        for r in range(p):
            acc_o, acc_l = empty_state(b, c, h, v.shape[-1], device=device)
            for src, blocks in table[r]:
                for blk in blocks:
                    o, lse_ = forward(qs[r][:, blk.q0:blk.q1], ks[src][:, blk.k0:blk.k1],
                                         vs[src][:, blk.k0:blk.k1], scale=scale, mask=blk.mask)
                    merge_(acc_o, acc_l, o, lse_, rows=slice(blk.q0, blk.q1))
            outs.append((acc_o.to(dtype), acc_l))
        return outs

    def backward_all(outs):
        dq = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in qs]
        dk = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in ks]
        dv = [torch.zeros(x.shape, dtype=torch.float32, device=device) for x in vs]
        for r in range(p):
            o, lse_ = outs[r]
            for src, blocks in table[r]:
                for blk in blocks:
                    rows, keys = slice(blk.q0, blk.q1), slice(blk.k0, blk.k1)
                    g = backward(dos[r][:, rows], qs[r][:, rows], ks[src][:, keys], vs[src][:, keys],
                                    o[:, rows], lse_[:, :, rows], scale=scale, mask=blk.mask,
                                    grad_dtype=torch.float32)
                    dq[r][:, rows] += g[0]
                    dk[src][:, keys] += g[1]
                    dv[src][:, keys] += g[2]
        return dq, dk, dv

    full_out, _ = forward(q, k, v, scale=scale, mask=mask)
    outs = forward_all()
    err = max((outs[r][0].float() - full_out.index_select(1, pos[r]).float()).abs().max().item()
              for r in range(p))
    ms = _time_ms(lambda: backward_all(forward_all()), device, warmup, iters)
    calls = sum(len(blocks) for row in table for _, blocks in row)
    return dict(virtual_ranks=p, schedule=_schedule(args), virtual_calls=calls, virtual_fwdbwd_ms=ms,
                virtual_ratio=ms / full_ms if full_ms else None, virtual_max_abs_err_out=err)


def _names(args) -> list[str]:
    return split_names(args.backends, "--backends")


def validate(args) -> None:
    """Arguments checked before any kernel runs. A backend that exists but cannot run here (flash without
    flash-attn, triton without a GPU) is a row marked skipped with the reason; a name that is no backend
    at all is a typo and an error."""
    from ..parallel.sequence import layouts

    report.check_args(args)
    cap = getattr(args, "softcap", None)
    if cap is not None and not (0 < cap < float("inf")):
        raise ValueError(f"--softcap must be a positive number (scores become C tanh(s / C)), got {cap}; leave it "
                         "out for no cap")
    names = _names(args)
    known = [*sorted(backends()), *sdpa_baselines.NAMES]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--backends {args.backends!r}: unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    # a row per backend that cannot run here says why; a run in which none can would measure nothing
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    q, k, v, _ = _tensors(1, 16, args.heads, args.kv_heads or args.heads, args.head_dim, report.DTYPES[args.dtype],
                          device, 0, args.v_head_dim)
    mask = _mask(args)
    reasons = {n: _why_not(n, q, k, v, mask, cap) for n in names}
    if all(reasons.values()):
        raise ValueError(f"--backends {args.backends!r}: none can run here ("
                         + "; ".join(f"{n}: {why}" for n, why in reasons.items())
                         + "); choose one that can (`longctx info` lists them)")
    if args.schedule is not None and not args.virtual_ranks:
        raise ValueError(f"--schedule {args.schedule} applies to --virtual-ranks P (one call split as P ranks would "
                         "run it); add --virtual-ranks, or drop --schedule")
    if args.virtual_ranks and all(n in sdpa_baselines.NAMES for n in names):
        raise ValueError(f"--virtual-ranks needs a backend that returns the log-sum-exp its blocks are merged with; "
                         f"--backends {args.backends!r} has only SDPA baselines ({', '.join(sdpa_baselines.NAMES)}); "
                         "add one of " + ", ".join(sorted(backends())) + ", or drop --virtual-ranks")
    if args.virtual_ranks:
        for s in args.seq_lens:
            layouts.check_seq(SCHEDULES[_schedule(args)], s, args.virtual_ranks,
                              what=f"--seq-lens ({args.virtual_ranks} virtual ranks, {_schedule(args)})")


def run(args) -> list[dict]:
    validate(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = report.DTYPES[args.dtype]
    if args.kv_heads is None:
        args.kv_heads = args.heads
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 1)
    iters = args.iters if args.iters is not None else (10 if device.type == "cuda" else 3)
    mask = _mask(args)
    names = _names(args)
    records = [_bench_one(n, args, s, dtype, device, mask, warmup, iters)
               for n in names for s in args.seq_lens]
    widths = args.head_dim if args.v_head_dim in (None, args.head_dim) else f"{args.head_dim} (v {args.v_head_dim})"
    capped = "" if args.softcap is None else f", scores soft-capped at {args.softcap:g}"
    print(f"kernel benchmark: {mask.kind}{capped}, batch {args.batch}, heads {args.heads}/{args.kv_heads}, head_dim "
          f"{widths}, {args.dtype} on {device} (TFLOP/s count allowed pairs only)")
    print(report.table(records, COLUMNS))
    if args.virtual_ranks:
        print(f"\nvirtual ranks: {args.virtual_ranks} x {_schedule(args)}: all ranks' block calls vs one call")
        print(report.table([r for r in records if "virtual_ratio" in r], VR_COLUMNS))
    report.write_json(args.json, records, meta=report.environment())
    series = {}
    for n in names:
        pts = [(r["seq_len"], r["fwdbwd_tflops"]) for r in records
               if r["backend"] == n and r["fwdbwd_tflops"]]
        if pts:
            series[n] = ([x for x, _ in pts], [y for _, y in pts])
    if series:
        report.plot_lines(args.plot, series, xlabel="sequence length", ylabel="fwd+bwd TFLOP/s",
                          title=f"attention kernels, {mask.kind}, d={args.head_dim}, {args.dtype}",
                          logx=max(args.seq_lens) >= 4 * min(args.seq_lens))
    return records


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m longctx.bench.kernel", description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

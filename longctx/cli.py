"""The `longctx` command: info, bench, demo."""

from __future__ import annotations

import argparse
import importlib
import platform
import sys

# bench name -> module with add_arguments(parser) and run(args) -> list[dict]
BENCHES = {
    "attention": ("longctx.bench.attention", "sequence-parallel attention strategies on a simulated cluster"),
    "kernel": ("longctx.bench.kernel", "local kernel backends: TFLOP/s for fwd, bwd, fwd+bwd"),
    "decode": ("longctx.bench.decode", "tree vs ring decoding over a sharded KV cache"),
    "dilated": ("longctx.bench.dilated", "LongNet dilated attention, local and distributed"),
}


def info() -> str:
    import torch
    import torch.distributed as dist

    from . import __version__
    from ._optional import probe
    from .kernels import backend_status, backends
    from .kernels import sdpa as sdpa_mod

    lines = [f"longctx {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
    else:
        lines.append("devices: cpu only (no CUDA device)")
    lines.append(
        "distributed: "
        + ", ".join(f"{n}={'yes' if ok else 'no'}" for n, ok in
                    (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())))
    )
    lines.append("optional packages:")
    for mod, extra in (("triton", "triton"), ("flash_attn", "flash"), ("ray", "ray"), ("deepspeed", "deepspeed"),
                       ("transformers", "hf"), ("omegaconf", "required")):
        ok, what = probe(mod)
        lines.append(f"  {mod:<13} {what if ok else 'missing (extra: ' + extra + ')'}")
    lines.append("kernel backends (auto picks the highest priority that supports a call):")
    status = backend_status()
    for name, b in sorted(backends().items(), key=lambda kv: -kv[1].priority):
        state = "available" if status[name] is None else f"unavailable: {status[name]}"
        lines.append(f"  {name:<10} priority {b.priority:>3}  {state}")
        for note in b.notes:
            lines.append(f"             {note}")
    if sdpa_mod.fallbacks:
        lines.append(f"sdpa fallbacks to reference in this process: {dict(sdpa_mod.fallbacks)}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="longctx", description="Exact sequence-parallel attention for long contexts")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices, kernel backends and why any is unavailable")
    sub.add_parser("demo", help="a short real run on a simulated 4-rank CPU cluster (what `make demo` runs)")
    bench = sub.add_parser("bench", help="benchmarks: tables, JSON, plots")
    bsub = bench.add_subparsers(dest="bench", required=True)
    for name, (module, helptext) in BENCHES.items():
        bp = bsub.add_parser(name, help=helptext, description=helptext)
        bp.set_defaults(_module=module)
        try:
            importlib.import_module(module).add_arguments(bp)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            bp.set_defaults(_missing=f"`longctx bench {name}` is not available in this build")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        print(info())
        return 0
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main()
    if getattr(args, "_missing", None):
        print(args._missing, file=sys.stderr)
        return 2
    importlib.import_module(args._module).run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

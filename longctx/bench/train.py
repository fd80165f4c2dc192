"""`longctx bench train`: training layouts of one config side by side.

Each layout is a comma-separated list of `parallel.*` keys without the prefix, e.g. `cp=4,strategy=zigzag` or
`dp_shard=2,cp=2`; keys a layout leaves out keep the config's values. Every layout runs in its own launch of
the simulated cluster (peak RSS is a per-process high-water mark), first counting the bytes of activations
saved for backward in one micro-batch on every rank and the bytes each mesh axis (tp, cp, dp, pp) moved in
one micro-batch's forward and backward, then training --steps steps. Reported: tokens/s and achieved FLOP/s
(median over the steps after the first; MFU on a GPU), saved-activation bytes, bytes per axis and peak memory
(the largest over ranks), and the loss of each step, with its largest relative difference from the first
layout's (the same config computes the same steps in every layout).
"""

from __future__ import annotations

import statistics
import tempfile

from .._argtypes import seconds
from . import report

COLUMNS = ["layout", "engine", "world_size", "tokens_per_s", "flops_per_s", "mfu", "saved_act_bytes_per_rank",
           "tp_bytes", "cp_bytes", "dp_bytes", "pp_bytes", "peak_mem_bytes", "loss_first", "loss_final",
           "max_rel_loss_diff"]
AXES = ("tp", "cp", "dp", "pp")


def add_arguments(p) -> None:
    p.add_argument("--config", required=True, help="YAML job config (e.g. configs/tiny.yaml)")
    p.add_argument("--world-size", type=int, default=4)
    p.add_argument("--layouts", nargs="+", action="extend", default=None,
                   help="layouts, each `key=value,...` over parallel.* keys (e.g. cp=4,strategy=ring dp_shard=2,cp=2)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--overrides", nargs="*", action="extend", default=None, metavar="key=value",
                   help="config overrides for all layouts")
    p.add_argument("--timeout", type=seconds, default=3600.0,
                   help="seconds each launch of the simulated ranks may take (default 3600)")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: tokens/s, saved activation bytes and final loss per layout")


def _layout_overrides(layout: str) -> list[str]:
    items = [x.strip() for x in layout.split(",")]
    bad = [x for x in items if "=" not in x]
    if bad or not items:
        raise ValueError(f"layout {layout!r} must be key=value pairs over parallel.* keys separated by commas, "
                         f"e.g. cp=4,strategy=zigzag")
    items = ["=".join(part.strip() for part in x.split("=", 1)) for x in items]  # "cp = 2" as cp=2
    keys = [x.split("=", 1)[0] for x in items]
    sections = sorted({k.split(".", 1)[0] for k in keys if "." in k})
    if sections:
        raise ValueError(f"layout {layout!r}: a layout sets parallel.* keys, without the prefix (e.g. cp=4); give "
                         f"{', '.join(s + '.*' for s in sections)} keys to every layout with --overrides")
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise ValueError(f"layout {layout!r} sets {', '.join(twice)} more than once; give each key once (separate "
                         "layouts with spaces: --layouts cp=4,strategy=zigzag cp=4,strategy=ring)")
    return [f"parallel.{x}" for x in items]


def _layout_overrides_keys(layout: str) -> set[str]:
    return {item.split("=", 1)[0] for item in _layout_overrides(layout)}


DEFAULT_LAYOUTS = ["cp=-1,strategy=zigzag"]  # every rank context-parallel, whatever --world-size
# what the bench sets itself, so an override of it would be replaced without a word
_BENCH_SETS = {"train.steps": "use --steps", "run_dir": "each layout runs in a directory of its own, removed after",
               "checkpoint.dir": "each layout checkpoints into its own run directory, removed after",
               "logging.quiet": "the bench prints its own table", "logging.tensorboard": "the bench writes no events"}


def _defaults(args) -> None:
    """--layouts and --overrides collect every repetition of the flag (action="extend"), so their defaults
    are filled in here rather than given to argparse (which would extend the default)."""
    args.layouts = args.layouts or list(DEFAULT_LAYOUTS)
    args.overrides = args.overrides or []


def _configs(args):
    from ..config import load
    from ..train import validate_job
    from ..train.machine import check_machine

    _defaults(args)
    for item in args.overrides:
        key = item.split("=", 1)[0].strip().lstrip("+~")
        if key in _BENCH_SETS:
            raise ValueError(f"--overrides {item}: the bench sets {key} itself ({_BENCH_SETS[key]}); drop it")
        for layout in args.layouts:  # applied after --overrides: the layout's value would win without a word
            if key in _layout_overrides_keys(layout):
                default = " (the default layout)" if args.layouts == DEFAULT_LAYOUTS else ""
                raise ValueError(f"--overrides {item}: layout {layout!r}{default} sets {key} too, and a layout's "
                                 f"setting wins; give it in --layouts (e.g. --layouts {layout},"
                                 f"{key.removeprefix('parallel.')}=...)")
    out = []
    for layout in args.layouts:
        overrides = [*args.overrides, *_layout_overrides(layout), f"train.steps={args.steps}", "logging.quiet=true",
                     "logging.tensorboard=false"]
        cfg = load(path=args.config, overrides=overrides)
        validate_job(cfg, args.world_size)
        check_machine(cfg, args.world_size, local_ranks=args.world_size)  # the layouts run here, every rank
        out.append((layout, cfg))
    return out


def validate(args) -> None:
    """Everything checkable before launching: arguments, the config, and every layout at this world size."""
    for name in ("world_size", "steps"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    report.check_args(args)
    _configs(args)


def _rank_main(config: dict) -> dict:
    from ..config import from_dict
    from ..train import Trainer

    trainer = Trainer(from_dict(config))
    saved = trainer.saved_activation_bytes()
    axes = None if trainer.engine is not None else trainer.axis_bytes()  # DeepSpeed reduces on its own
    summary = trainer.fit()
    return {"saved": saved, "axes": axes, "summary": summary, "history": trainer.history}


def run(args) -> list[dict]:
    from omegaconf import OmegaConf

    from ..launch import run as launch

    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (layout, cfg) in enumerate(_configs(args)):
            cfg.run_dir = f"{tmp}/layout{i}"
            res = launch(_rank_main, args.world_size, args=(OmegaConf.to_container(cfg),), timeout=args.timeout,
                         pg_timeout=cfg.parallel.timeout_s)
            hist = res[0]["history"]
            timed = hist[1:] or hist
            records.append({
                "layout": layout, "engine": res[0]["summary"]["engine"], "world_size": args.world_size,
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
                "flops_per_s": statistics.median(r["flops_per_s"] for r in timed),
                # the median step's, as FLOP/s (each step's MFU is its FLOP/s over one peak); null without a peak
                "mfu": statistics.median(r["mfu"] for r in timed) if timed[-1]["mfu"] is not None else None,
                "saved_act_bytes_per_rank": max(r["saved"] for r in res),
                "saved_act_bytes_by_rank": [r["saved"] for r in res],
                **{f"{a}_bytes": (max(r["axes"][a] for r in res) if res[0]["axes"] else None) for a in AXES},
                "peak_mem_bytes": max(r["peak_mem_bytes"] for r in hist),
                "losses": [r["loss"] for r in hist], "loss_first": hist[0]["loss"], "loss_final": hist[-1]["loss"],
            })
    base = records[0]["losses"]
    for r in records:
        r["max_rel_loss_diff"] = max(abs(a - b) / max(abs(b), 1e-30) for a, b in zip(r["losses"], base))
    print(report.table(records, COLUMNS))
    print("(tokens/s and FLOP/s: whole job, median over steps after the first; saved_act_bytes_per_rank: tensors "
          "saved for backward in one micro-batch, largest rank; {tp,cp,dp,pp}_bytes: sent by the busiest rank on "
          "each axis in one micro-batch's forward + backward, counted at every collective; peak_mem: peak RSS on "
          "CPU / allocated on GPU)")
    report.write_json(args.json, records, meta={**report.environment(), "config": args.config,
                                                "overrides": args.overrides or [], "steps": args.steps})
    report.plot_bars(args.plot, [r["layout"] for r in records], {
        "tokens/s": [r["tokens_per_s"] for r in records],
        "saved activations per rank (MiB)": [r["saved_act_bytes_per_rank"] / 2**20 for r in records],
        "bytes sent per rank, all axes (MiB)": [None if r["tp_bytes"] is None else  # DeepSpeed's are not counted
                                                sum(r[f"{a}_bytes"] for a in AXES) / 2**20 for r in records],
        "final loss": [r["loss_final"] for r in records],
    }, title=f"longctx bench train: {args.config} on {args.world_size} ranks")
    return records

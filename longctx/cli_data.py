"""`longctx data prepare` and `longctx eval needle|ppl`: the command side (parsing lives in cli.py, which runs
these inside its user-error handling: a ValueError here is the user's, printed as one line)."""

from __future__ import annotations

import argparse
import os


def cmd_data_prepare(args) -> int:
    from .data.prepare import format_summary, prepare

    summary = prepare(args.input, args.output, tokenizer=args.tokenizer, text_key=args.text_key,
                      workers=args.workers, strict=args.strict, add_eos=not args.no_eos, progress=not args.quiet)
    print(format_summary(summary, args.output))
    return 0


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def _checkpoint_config(args):
    from .config import load
    from .train.checkpoint import locate

    found = locate(args.checkpoint, f"--checkpoint {args.checkpoint!r}", log=lambda *a, **k: None)
    return load(path=os.path.join(found, "config.yaml"))  # written resolved: an HF model's sizes are in it


def _check_ppl_args(args, cfg) -> None:
    from .eval.ppl import check_ppl

    check_ppl(args.data or cfg.data.path, seq_len=args.seq_len or cfg.train.seq_len, sequences=args.sequences,
              buckets=args.buckets, strategy=args.strategy, world=args.nproc // args.tp,
              vocab_size=cfg.model.vocab_size, tp=args.tp)


def cmd_eval(args) -> int:
    import json

    from .eval.needle import check_grid, format_table, write_needle
    from .eval.weights import check_eval_tp
    from .launch import run
    from .launch.entry import eval_main
    from .parallel.sequence.registry import get_strategy

    kind = args.eval_command
    params = {k: getattr(args, k, None) for k in ("checkpoint", "lengths", "depths", "samples", "decode", "strategy",
                                                   "data", "seq_len", "sequences", "buckets", "tp")}
    get_strategy(args.strategy)
    if kind == "needle":
        check_grid(args.lengths, args.depths, args.samples)
    if not os.path.exists(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint!r} does not exist; give a checkpoint directory "
                         "(step_NNNNNNNN) or a checkpoint root (run_dir/checkpoints)")
    if args.nproc % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide --nproc {args.nproc}: the ranks are --nproc/--tp "
                         f"context-parallel groups of --tp tensor-parallel ranks; choose a divisor of {args.nproc}")
    cfg = _checkpoint_config(args)
    check_eval_tp(cfg, args.tp)
    if kind == "ppl":
        _check_ppl_args(args, cfg)
    if args.nproc > 1:
        records = run(eval_main, args.nproc, args=(kind, params), timeout=24 * 3600.0)[0]
    else:
        records = eval_main(kind, params)
    if kind == "needle":
        print(format_table(records))
        write_needle(records, args.json, args.plot)
    else:
        for r in records:
            print(f"positions {r['bucket_start']:>7}-{r['bucket_end']:<7} tokens {r['tokens']:>9}  loss "
                  f"{r['loss']:.4f}  ppl {r['ppl']:.3f}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump(records, f, indent=1)
    return 0



"""`longctx bench packing`: counted attention work of packed documents per layout, and what balancing does.

Sequences are packed from document lengths drawn from a long-tailed (Pareto) distribution, like real
corpora: many short documents, a few long ones. For every layout the planner's block tables (the work
each schedule records, see tests/parallel/sequence/test_documents.py) give each rank's pairs per ring
step; reported are the ring critical-path imbalance (ranks wait for the slowest at every step), the
per-rank total imbalance (all-gather: one step), both for the documents as packed and after the
planner's reordering (parallel.balance_documents), and the work packing saves against one causal document.
Counted, not timed: the numbers are exact and the same on any machine.
"""

from __future__ import annotations

import math

import numpy as np

from .._argtypes import int_list, seed, split_names
from ..parallel.sequence.balance import balanced_order
from ..parallel.sequence.layouts import LAYOUTS, check_seq, divisor
from ..parallel.sequence.plan import imbalance, work_table
from . import report


def add_arguments(p) -> None:
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--world-size", type=int_list, default=[4, 8], help="comma-separated context-parallel degrees")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--batch", type=int, default=4, help="packed sequences averaged over")
    p.add_argument("--mean-doc", type=int, default=512, help="scale of the document lengths (tokens)")
    p.add_argument("--alpha", type=float, default=1.1, help="Pareto tail index (smaller: heavier tail)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None, help="PNG: imbalance per layout, as packed and balanced")


def validate(args) -> None:
    report.check_args(args)
    layouts = split_names(args.layouts, "--layouts")
    bad = [x for x in layouts if x not in LAYOUTS]
    if bad:
        raise ValueError(f"--layouts {args.layouts!r}: choose from {', '.join(LAYOUTS)}")
    if not args.world_size or any(w < 1 for w in args.world_size):
        raise ValueError("--world-size must list positive integers, e.g. --world-size 4,8")
    need = math.lcm(*(divisor(layout, w) for w in args.world_size for layout in layouts))
    if args.seq_len % need:  # one length for every layout and world size: their common multiple
        fit = args.seq_len + (-args.seq_len) % need
        raise ValueError(f"--seq-len {args.seq_len}: every layout ({', '.join(layouts)}) over every --world-size "
                         f"({', '.join(map(str, args.world_size))}) needs a multiple of {need}; use {fit}")
    for w in args.world_size:
        for layout in layouts:
            check_seq(layout, args.seq_len, w, what="--seq-len")
    if args.mean_doc < 1 or not (math.isfinite(args.alpha) and args.alpha > 0):
        raise ValueError(f"--mean-doc must be >= 1 and --alpha a finite number > 0, got {args.mean_doc} and "
                         f"{args.alpha}")


def pack(seq_len: int, mean_doc: int, alpha: float, rng) -> list[int]:
    """Document lengths filling one sequence (the last one cut to fit)."""
    lengths = []
    while sum(lengths) < seq_len:
        lengths.append(int(min(rng.pareto(alpha) * mean_doc + 1, seq_len)))
    lengths[-1] -= sum(lengths) - seq_len
    return [x for x in lengths if x > 0]


def run(args) -> list[dict]:
    validate(args)
    layouts = split_names(args.layouts, "--layouts")
    rng = np.random.default_rng(args.seed)
    batches = [pack(args.seq_len, args.mean_doc, args.alpha, rng) for _ in range(args.batch)]
    n = args.seq_len
    records = []
    for world in args.world_size:
        for layout in layouts:
            acc = {k: [] for k in ("ring", "ring_bal", "rank", "rank_bal", "work")}
            for lengths in batches:
                order, _, _ = balanced_order(lengths, layout, world, seed=args.seed)
                for key, lens in (("", lengths), ("_bal", [lengths[i] for i in order])):
                    starts = tuple(int(s) for s in np.cumsum([0, *lens[:-1]]))
                    table = work_table(layout, n, world, True, None, starts)
                    totals = [sum(row[r] for row in table) for r in range(world)]
                    acc["ring" + key].append(imbalance(table))
                    acc["rank" + key].append(max(totals) / (sum(totals) / world))
                    if not key:
                        acc["work"].append(sum(totals) / (n * (n + 1) / 2))
            records.append({"layout": layout, "world": world, "seq_len": n,
                            "docs_per_seq": float(np.mean([len(b) for b in batches])),
                            "longest_doc": max(max(b) for b in batches),
                            "ring_imbalance": float(np.mean(acc["ring"])),
                            "ring_imbalance_balanced": float(np.mean(acc["ring_bal"])),
                            "rank_imbalance": float(np.mean(acc["rank"])),
                            "rank_imbalance_balanced": float(np.mean(acc["rank_bal"])),
                            "work_vs_one_document": float(np.mean(acc["work"]))})
    cols = ["layout", "world", "seq_len", "docs_per_seq", "ring_imbalance", "ring_imbalance_balanced",
            "rank_imbalance", "rank_imbalance_balanced", "work_vs_one_document"]
    print(report.table(records, cols))
    report.write_json(args.json, records, meta={"mean_doc": args.mean_doc, "alpha": args.alpha, "batch": args.batch,
                                                "seed": args.seed})
    labels = [f"{r['layout']} W={r['world']}" for r in records]
    report.plot_bars(args.plot, labels, {"ring imbalance (as packed)": [r["ring_imbalance"] for r in records],
                                         "ring imbalance (balanced)": [r["ring_imbalance_balanced"] for r in records]},
                     title="packed documents: counted work imbalance")
    return records

"""Needle-in-a-haystack accuracy by context length and needle depth.

Each cell generates the answer of `samples` held-out examples (indices far from any training index) with
greedy decoding over the ranks of the process group (context-parallel prefill, tree decoding) and counts
exact matches of all the answer's digits. The task is the checkpoint's retrieval task (its data section:
digits, alphabet, pairs; the haystack is random filler unless asked otherwise; recall puts the asked fact at
the depth and its other facts around it); a model trained on something else is evaluated on `needle`.
"""

from __future__ import annotations

import torch

from .._paths import save_figure, write_json
from ..data.tasks import RETRIEVAL, RetrievalTask

HELD_OUT = 10**9  # example indices for evaluation start here: training reads indices from 0 upwards


def _task(cfg, length: int, haystack: str | None = None) -> RetrievalTask:
    d = cfg.data
    kind = d.source if d.source in RETRIEVAL else "needle"
    return RetrievalTask(kind=kind, seq_len=length, vocab_size=cfg.model.vocab_size, seed=cfg.train.seed + 1,
                         alphabet=d.alphabet, digits=d.digits, pairs=d.pairs, haystack=haystack or d.haystack)


def check_grid(lengths, depths, samples) -> None:
    if not lengths or any(n < 1 for n in lengths):
        raise ValueError("--lengths must be positive token counts, e.g. --lengths 128,256,512")
    if not depths or any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError("--depths must be fractions between 0 and 1, e.g. --depths 0,0.5,1")
    if samples < 1:
        raise ValueError("--samples must be >= 1")
    for flag, values in (("--lengths", lengths), ("--depths", depths)):
        twice = sorted({v for v in values if list(values).count(v) > 1})
        if twice:  # the grid would hold the cell twice (the table shows one, the JSON both)
            raise ValueError(f"{flag} lists {', '.join(map(str, twice))} more than once; give each value once")


def check_lengths(cfg, lengths, haystack: str | None = None) -> None:
    """Every --lengths value fits the checkpoint's retrieval task (ValueError naming the length), after what
    no length changes (the model's vocabulary against the task's symbols: not a --lengths problem)."""
    try:
        _task(cfg, 1 << 20, haystack)
    except ValueError as e:
        raise ValueError(f"this checkpoint's model cannot take the retrieval task at any --lengths: {e}") from None
    for n in lengths:
        try:
            _task(cfg, n, haystack)
        except ValueError as e:
            raise ValueError(f"--lengths {n}: " + str(e).replace(f"train.seq_len={n}", "this length")) from None


BATCH = 8  # prompts generated together (what `longctx eval needle` checks memory for)


def needle_grid(model, cfg, lengths, depths, *, samples: int = 20, batch: int = BATCH, strategy: str = "zigzag",
                decode: str = "tree", kernel: str = "auto", haystack: str | None = "random", log=None,
                group=None) -> list[dict]:
    """[{length, depth, accuracy, correct, samples}] for every (length, depth), over the context-parallel
    ranks `group` (None: the current process group, or one process; a tensor-parallel model: its mesh's cp
    group). haystack: random filler (default, whatever the model trained on) or None (the checkpoint's
    data.haystack)."""
    check_grid(lengths, depths, samples)
    check_lengths(cfg, lengths, haystack)  # a length too short for the task fails before any generation
    records = []
    for length in lengths:
        task = _task(cfg, length, haystack)
        for depth in depths:
            correct = 0
            for first in range(0, samples, batch):
                idx = range(HELD_OUT + first, HELD_OUT + min(samples, first + batch))
                pairs = [task.prompt(i, length, depth) for i in idx]
                out = model.generate([p for p, _ in pairs], max_new_tokens=task.digits, strategy=strategy,
                                     decode=decode, kernel=kernel, group=group)
                correct += sum(int(torch.equal(got, want)) for got, (_, want) in zip(out.tokens, pairs))
            records.append({"length": length, "depth": depth, "accuracy": correct / samples, "correct": correct,
                            "samples": samples})
            if log:
                log(f"length {length:>7}  depth {depth:.2f}  accuracy {correct / samples:.3f}")
    return records


def write_needle(records: list[dict], json_path: str | None, plot_path: str | None) -> None:
    if json_path:
        write_json(json_path, records, indent=1)
    if plot_path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        lengths = sorted({r["length"] for r in records})
        depths = sorted({r["depth"] for r in records})
        grid = [[next(r["accuracy"] for r in records if r["length"] == n and r["depth"] == d) for n in lengths]
                for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 * len(lengths) + 2.5, 0.5 * len(depths) + 2))
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        for i, row in enumerate(grid):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.2f}", ha="center", va="center", fontsize=8)
        fig.colorbar(im, ax=ax, label="accuracy")
        ax.set_title("needle in a haystack")
        fig.tight_layout()
        save_figure(fig, plot_path)
        plt.close(fig)


def format_table(records: list[dict]) -> str:
    lengths = sorted({r["length"] for r in records})
    depths = sorted({r["depth"] for r in records})
    acc = {(r["length"], r["depth"]): r["accuracy"] for r in records}
    lines = ["depth \\ length " + "".join(f"{n:>9}" for n in lengths)]
    for d in depths:
        lines.append(f"{d:>14.2f} " + "".join(f"{acc[(n, d)]:>9.2f}" for n in lengths))
    return "\n".join(lines)

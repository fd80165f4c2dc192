"""Shared output for benchmarks: a fixed-width table, a JSON list of records, an optional PNG plot."""

from __future__ import annotations

import math
import time

import torch

from .._optional import require
from .._paths import check_distinct, check_output, check_plot, save_figure
from .._paths import write_json as write_file

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def sync_device(device: torch.device) -> None:
    """Wait for queued GPU work, so a timer measures it (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rank_device(barrier: bool = True):
    """(device, sync) for timing on a rank of the world group: the group's device (CUDA under NCCL), and a
    sync that waits for that device and then, with barrier=True, for every rank."""
    from ..parallel.comm import Comm

    comm = Comm.get(None)
    dev = comm.device

    def sync():
        sync_device(dev)
        if barrier:
            comm.barrier()

    return dev, sync


def fmt(v) -> str:
    if v is None:  # a figure this machine cannot give (MFU without a known peak)
        return "n/a"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if v == 0:
            return "0"
        a = abs(v)
        return f"{v:.3e}" if a < 1e-3 or a >= 1e6 else f"{v:.4g}"
    return str(v)


def table(records: list[dict], columns: list[str]) -> str:
    rows = [[fmt(r.get(c, "")) for c in columns] for r in records]
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def write_json(path: str | None, records: list[dict], meta: dict | None = None) -> None:
    """Write the records as a JSON list (meta, if given, goes into every record under 'meta')."""
    if not path:
        return
    if meta:
        records = [{**r, "meta": meta} for r in records]
    write_file(path, records)


def plot_lines(path: str | None, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str,
               logx: bool = False) -> None:
    if not path:
        return
    matplotlib = require("matplotlib", "benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def environment() -> dict:
    import platform

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"torch": torch.__version__, "device": dev, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}


def plot_bars(path: str | None, labels: list[str], series: dict[str, list[float]], *, title: str) -> None:
    """One panel per series, one horizontal bar per label (long labels stay readable); a None value, a figure
    the run could not give, reads n/a instead of a bar."""
    if not path:
        return
    matplotlib = require("matplotlib", "benchmark plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 4.0 * len(series) + 0.09 * max(len(x) for x in labels)
    fig, axes = plt.subplots(1, len(series), figsize=(width, 1.2 + 0.38 * len(labels)), sharey=True)
    axes = [axes] if len(series) == 1 else list(axes)
    ys = list(range(len(labels)))
    for ax, (name, values) in zip(axes, series.items()):
        ax.barh(ys, [0 if v is None else v for v in values])
        for y, v in zip(ys, values):
            if v is None:
                ax.text(0, y, " n/a", va="center")
        ax.set_yticks(ys, labels)
        ax.set_title(name)
        ax.grid(True, axis="x", alpha=0.3)
    axes[0].invert_yaxis()  # first label on top, in table order (once: the panels share the y axis)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


POSITIVE = ("world_size", "seq_len", "batch", "heads", "kv_heads", "head_dim", "v_head_dim", "iters", "steps",
            "new_tokens", "ulysses")
NON_NEGATIVE = ("warmup", "virtual_ranks", "check_max_len", "check_len")  # check lengths: 0 skips the check


def check_args(args) -> None:
    """Shared argument checks of the benchmarks, run before anything is launched: positive sizes, and query
    heads a multiple of the K/V heads. Errors name the flag."""
    for name in POSITIVE + NON_NEGATIVE:
        value = getattr(args, name, None)
        low = 1 if name in POSITIVE else 0
        if value is not None and not isinstance(value, bool) and isinstance(value, int) and not low <= value < 2**63:
            raise ValueError(f"--{name.replace('_', '-')} must be {'a positive' if low else 'a non-negative'} "
                             f"integer below 2**63, got {value}")
    for name in ("seq_lens", "context", "segment_lengths", "dilation_rates"):
        values = getattr(args, name, None)
        if values is not None and (not values or any(v < 1 for v in values)):
            raise ValueError(f"--{name.replace('_', '-')} must list positive integers, got {values}")
    check_output(getattr(args, "json", None), "--json")
    check_plot(getattr(args, "plot", None))
    check_distinct(getattr(args, "json", None), getattr(args, "plot", None))
    heads, kv = getattr(args, "heads", None), getattr(args, "kv_heads", None)
    if heads and kv and heads % kv:
        raise ValueError(f"--heads {heads} must be a multiple of --kv-heads {kv} (GQA groups)")
    window = getattr(args, "window", None)
    if window is not None and window < 1:
        raise ValueError(f"--window must be a positive integer (keys each query sees), got {window}; "
                         f"leave it out for no window")
    _check_kernel(args)
    _check_devices(getattr(args, "backend", None), getattr(args, "device", None))


def _check_kernel(args) -> None:
    """--kernel of the distributed benches: a registered backend that can run on this machine (or auto), and
    takes the bench's calls (its --dtype, heads and head width, on the ranks' device): refused here in one line,
    not by every rank at its first call."""
    from ..kernels import NO_MASK, Probe, backends, check_name, missing_capability

    name = getattr(args, "kernel", None)
    if name is None or name == "auto":
        return
    check_name(name, "--kernel ")
    backend = backends()[name]
    why = backend.availability() or missing_capability(backend, getattr(args, "softcap", None))
    if not why and getattr(args, "dtype", None) in DTYPES and getattr(args, "head_dim", None):
        on_gpu = torch.cuda.is_available() and getattr(args, "backend", None) != "gloo"
        device, dtype = torch.device("cuda" if on_gpu else "cpu"), DTYPES[args.dtype]
        heads = getattr(args, "heads", None) or 1
        kv_heads = getattr(args, "kv_heads", None) or heads
        v_width = getattr(args, "v_head_dim", None) or args.head_dim
        why = backend.supports(Probe((1, 1, heads, args.head_dim), dtype, device),
                               Probe((1, 1, kv_heads, args.head_dim), dtype, device),
                               Probe((1, 1, kv_heads, v_width), dtype, device), NO_MASK)
    if why:
        raise ValueError(f"--kernel {name} cannot run here: {why}; use --kernel auto")


def _check_devices(backend: str | None, device: str | None) -> None:
    """--backend (process group) and --device: known names, and CUDA only where there is a GPU."""
    if backend is not None:
        if backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"--backend {backend!r} is not a process group backend; choose auto, gloo or nccl")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("--backend nccl needs CUDA GPUs and there are none here; use --backend gloo (or auto)")
    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError:
            raise ValueError(f"--device {device!r} is not a device; use cpu or cuda (cuda:N)") from None
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"--device {device!r}: the benchmarks run on cpu or cuda")
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device} asked for but torch sees no CUDA GPU here; use --device cpu "
                             f"(or leave it out)")

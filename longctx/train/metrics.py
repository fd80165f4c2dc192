"""What a training step reports: model FLOPs (attention counted for the mask actually used), achieved
FLOP/s and MFU, peak memory, and the bytes of activations saved for backward (counted, not timed).
Rank 0 writes metrics.jsonl and TensorBoard events and shows a progress bar.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time

import torch

from ..config import head_dim_of

# dense peak FLOP/s per GPU (no sparsity), by a substring of the device name (SXM parts): bf16 and TF32 on the
# tensor cores, fp32 the IEEE rate of the CUDA cores
PEAK_FLOPS = {
    "H200": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "H100": {"bf16": 989e12, "tf32": 494.5e12, "fp32": 67e12},
    "A100": {"bf16": 312e12, "tf32": 156e12, "fp32": 19.5e12},
    "L40S": {"bf16": 362e12, "tf32": 183e12, "fp32": 91.6e12},
}


def peak_kind(precision: str) -> str:
    """Which peak a precision's matmuls run at: fp32 is TF32 only where the process allowed it
    (torch.backends.cuda.matmul.allow_tf32, set_float32_matmul_precision, or the newer
    torch.backends.cuda.matmul.fp32_precision = "tf32"); torch's default is IEEE fp32."""
    if precision == "bf16":
        return "bf16"
    try:
        return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    except RuntimeError:  # the process set torch's per-backend API (fp32_precision), which the legacy query refuses
        return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "fp32"


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for the precision (peak_kind), or None (CPU, unknown GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():
        if key in name:
            return peaks[peak_kind(precision)]
    return None


def _layer_pairs(window: int | None, chunk: int | None, length: int) -> int:
    """Causal pairs of one document of `length` tokens under a layer's window or chunks (closed form: it
    runs per layer per packed document inside the timed step)."""
    if chunk:
        full, rest = divmod(length, chunk)
        return full * chunk * (chunk + 1) // 2 + rest * (rest + 1) // 2
    if window is None or length <= window:
        return length * (length + 1) // 2
    return window * (window + 1) // 2 + (length - window) * window


def attention_pairs(model_cfg, seq_len: int) -> int:
    """(query, key) pairs per sequence per head, summed over layers, for the masks the model uses:
    causal (with the sliding window, if any) on ordinary layers; each LongNet pattern's causal pairs
    inside its sparsified segments on dilated layers."""
    from ..model.llama import dilated_pattern

    dense = _layer_pairs(model_cfg.window, None, seq_len)
    total = 0
    for layer in range(model_cfg.n_layers):
        if layer not in model_cfg.dilated.layers:
            total += dense
            continue
        for w, r in zip(*dilated_pattern(model_cfg, seq_len)):
            w = min(w, seq_len)
            m = w // r
            total += (seq_len // w) * m * (m + 1) // 2
    return total


def document_attention_pairs(model_cfg, documents) -> int:
    """attention_pairs for packed sequences: the causal (windowed) pairs inside each document of each row
    of `documents`, summed over layers. The pairs across a boundary are masked and never computed, so a
    full-sequence count would credit the step with work it did not do. (Packing refuses dilated layers.)"""
    per_layer = sum(_layer_pairs(model_cfg.window, None, n) for row in range(documents.batch)
                    for n in documents.lengths(row))
    return model_cfg.n_layers * per_layer


def hf_layers_of(model_cfg) -> list[dict] | None:
    """Every layer's attention (model.hf_flops.attention_layers) of the Hugging Face model a config trains;
    None for longctx's own model."""
    if not model_cfg.hf_path:
        return None
    from ..model.hf_checks import read_hf_config
    from ..model.hf_flops import attention_layers

    return attention_layers(read_hf_config(model_cfg.hf_path))


def layer_attention_work(layers: list[dict], heads: int, lengths: list[int]) -> int:
    """Sum over layers of heads x (q/k width + v width) x causal pairs, for one sequence holding documents of
    `lengths` (one, unpacked): what attention FLOPs scale with when layers differ (windows, chunks, widths)."""
    return sum(heads * (layer["qk_dim"] + layer["v_dim"]) * sum(_layer_pairs(layer["window"], layer["chunk"], n)
                                                                 for n in lengths)
               for layer in layers)


def packed_attention_work(model_cfg, layers: list[dict] | None, documents) -> int:
    """The attention work (heads x q/k + v widths x pairs, over layers) of packed rows: only the pairs inside
    documents, which is all the planner computes; `layers`: a Hugging Face model's (hf_layers_of)."""
    if layers is None:
        return model_cfg.n_heads * 2 * head_dim_of(model_cfg) * document_attention_pairs(model_cfg, documents)
    heads = model_cfg.n_heads
    return sum(layer_attention_work(layers, heads, documents.lengths(row)) for row in range(documents.batch))


def model_flops_per_step(model_cfg, seq_len: int, sequences: int, pairs: int | None = None,
                         layers: list[dict] | None = None, work: int | None = None) -> dict:
    """Training FLOPs of one optimizer step: 6 per parameter per token for every matmul (the embedding
    lookup is not a matmul), plus attention: 2 per pair per q/k feature (QK^T) and 2 per value feature (PV)
    forward, x3 with the backward. `pairs`: the step's attention pairs over all its sequences and layers
    when they are not `sequences` x attention_pairs (packed documents: document_attention_pairs summed over
    the batch). `layers`: a Hugging Face model's attention per layer (hf_layers_of: projections, widths,
    windows, chunks), counted by layer_attention_work. `work`: the attention work of packed sequences
    (packed_attention_work summed over the step), for either model."""
    c = model_cfg
    if layers is None:
        hd = head_dim_of(c)
        attn_params = c.n_layers * (c.dim * c.n_heads * hd * 2 + c.dim * c.n_kv_heads * hd * 2)
        if work is None:
            work = c.n_heads * 2 * hd * (attention_pairs(c, seq_len) * sequences if pairs is None else pairs)
    else:
        attn_params = sum(layer["params"] for layer in layers)
        if work is None:
            work = sequences * layer_attention_work(layers, c.n_heads, [seq_len])
    matmul_params = attn_params + c.n_layers * 3 * c.dim * c.ffn_dim + c.dim * c.vocab_size
    dense = 6 * matmul_params * seq_len * sequences
    attn = 6 * work
    return {"dense": dense, "attention": attn, "total": dense + attn}


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory on CUDA; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


class SavedTensorCounter:
    """Counts the bytes of tensors autograd saves for backward inside the `with` block (each storage once,
    parameters excluded: they are not activations). `by_shape` keeps bytes per shape, for assertions on
    what kind of tensor was kept. Every counted storage is held until the block ends: a storage is known
    by its address, and when backward runs inside the block (a pipeline schedule) a freed address would
    otherwise be reused by a later microbatch's tensor and that tensor missed (seen: counts that varied
    from run to run)."""

    def __init__(self, model: torch.nn.Module | None = None):
        self.model = model
        self.bytes = 0
        self.by_shape: dict[tuple, int] = {}
        self._seen: set = set()
        self._held: list = []
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        from torch.distributed.tensor import DTensor

        local = t.to_local() if isinstance(t, DTensor) else t
        try:
            storage = local.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. fake/meta)
            return t
        if key not in self._seen and key[0] not in self._param_ptrs():
            self._seen.add(key)
            self._held.append(storage)
            self.bytes += key[1]
            shape = tuple(local.shape)
            self.by_shape[shape] = self.by_shape.get(shape, 0) + key[1]
        return t

    def _param_ptrs(self) -> set:
        if self.model is None:
            return set()
        ptrs = set()
        for p in self.model.parameters():
            from torch.distributed.tensor import DTensor

            local = p.to_local() if isinstance(p, DTensor) else p
            ptrs.add(local.untyped_storage().data_ptr())
        return ptrs

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        self._held.clear()
        return False


class MetricsLogger:
    """metrics.jsonl (one object per optimizer step), TensorBoard events and a tqdm bar, on rank 0 only."""

    def __init__(self, run_dir: str, *, enabled: bool, total_steps: int, quiet: bool, tensorboard: bool,
                 resumed_step: int | None = None):
        self.enabled = enabled
        self.bar = self.writer = self.file = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        _tidy(path, resumed_step)
        self.file = open(path, "a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print("longctx: tensorboard is not installed (pip install 'longctx[dev]'); metrics.jsonl is still "
                      "written", file=sys.stderr)
            else:
                # a resumed run discards the lost attempt's points after its step, as in metrics.jsonl
                self.writer = SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"),
                                            purge_step=None if resumed_step is None else resumed_step + 1)
        if not quiet:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, desc="train", unit="step", dynamic_ncols=True, file=sys.stdout)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step" and value is not None:
                    tag = f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"train/{key}"
                    self.writer.add_scalar(tag, value, record["step"])
        if self.bar is not None:
            post = {"loss": f"{record['loss']:.4f}", "tok/s": f"{record['tokens_per_s']:.0f}"}
            if "val_loss" in record:
                post["val"] = f"{record['val_loss']:.4f}"
            if record.get("mfu") is not None:
                post["mfu"] = f"{100 * record['mfu']:.1f}%"
            else:
                post["FLOP/s"] = f"{record['flops_per_s']:.2e}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.file is not None:
            self.file.close()


SUPERSEDED = "metrics.superseded.jsonl"


def _tidy(path: str, resumed_step: int | None) -> None:
    """Before appending: drop a last line cut short by a killed writer, and the records of the steps this run
    computes (again): past the step it resumes at, or all of them for a run starting at step 0 in a run_dir that
    has some (an earlier run's), so every step appears once and one run's records are never mixed with
    another's. What leaves metrics.jsonl is appended to metrics.superseded.jsonl beside it: nothing is lost.
    Rewritten through a temporary file and a rename: a crash here loses nothing."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    whole = [line if line.endswith("\n") else line + "\n" for line in lines]
    steps = list(map(_step_of, lines))
    kept = [line for line, step in zip(whole, steps) if step is not None and (resumed_step is None or
                                                                              step <= resumed_step)]
    if kept == lines:
        return
    moved = [line for line, step in zip(whole, steps) if step is not None and resumed_step is not None and
             step > resumed_step]
    superseded = os.path.join(os.path.dirname(path), SUPERSEDED)
    if moved:
        with open(superseded, "a") as f:
            f.writelines(moved)
            f.flush()
            os.fsync(f.fileno())
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    cut = len(lines) - len(kept) - len(moved)
    parts = ([f"moved {len(moved)} record(s) of steps after {resumed_step} (an earlier run's, or the attempt this run "
              f"continues) to {superseded}"] if moved else []) + ([f"dropped {cut} line(s) cut short"] if cut else [])
    print(f"longctx: metrics.jsonl: {'; '.join(parts)}", file=sys.stderr)


def _step_of(line: str) -> int | None:
    try:  # a line cut short by a killed writer does not parse
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class StepTimer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0
        return False

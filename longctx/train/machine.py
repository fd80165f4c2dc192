"""What only the machine that runs a job can answer, checked before any rank builds anything: a named kernel
backend is usable here, and each rank's memory (its GPU's, else its share of RAM and the cgroup's limit) holds
at least the floor a training step, an evaluation or a generation needs. Not part of validate_job, which
also checks configs for other machines (`config show` on a login node, the driver of a Ray job)."""

from __future__ import annotations

import os

from ..config import ConfigError
from ..parallel.dims import ParallelDims
from ..parallel.pipeline import n_microbatches
from .setup import dims_from_config


def check_machine(cfg, world_size: int | None = None, local_ranks: int = 1) -> None:
    """A named kernel backend is usable here, and (given the world size, `local_ranks` of its ranks on this
    machine) each rank's memory holds the least the step needs."""
    from ..kernels import backends

    name = cfg.parallel.kernel
    why = None if name == "auto" else backends()[name].availability()
    if why:
        raise ConfigError(f"parallel.kernel={name} cannot run on this machine: {why}; use parallel.kernel=auto "
                          f"(the fastest backend that can run each call)")
    if world_size is not None:
        dims = dims_from_config(cfg, world_size)
        why = None if name == "auto" else kernel_problem(cfg, dims, backends()[name])
        if why:
            raise ConfigError(f"parallel.kernel={name} cannot run this job's attention calls: {why}; use "
                              "parallel.kernel=auto (each call runs on the fastest backend that can take it)")
        _check_memory(cfg, dims, local_ranks)


def kernel_problem(cfg, dims: ParallelDims, backend) -> str | None:
    """Why `backend` would refuse one of the local attention calls this job makes (None: it takes them all),
    asked of its `supports` with the job's dtype, device, heads per rank, head width and the masks of the
    strategy's block table (every rank against every shard: offsets, shifted bands, windows; document masks
    when the data packs documents). A named backend refused at its first call would fail every rank there."""
    import torch

    from ..config import head_dim_of
    from ..data.sources import packs_documents
    from ..kernels import Probe
    from ..kernels.mask import Mask
    from ..parallel.dims import device_type_from_env
    from ..parallel.sequence.plan import step_blocks
    from ..parallel.sequence.registry import get_strategy
    from .setup import resolve_precision

    device = torch.device(device_type_from_env())
    dtype = torch.bfloat16 if resolve_precision(cfg.train.precision, device.type) == "bf16" else torch.float32
    m, n = cfg.model, cfg.train.seq_len
    ulysses = dims.cp if dims.strategy == "ulysses" else dims.ulysses if dims.strategy == "hybrid" else 1
    heads, width = max(1, m.n_heads // dims.tp // ulysses), head_dim_of(m)
    ring = dims.cp // ulysses  # the ranks whose shards the block table pairs (1: one local call)
    layout = get_strategy(dims.strategy).layout(dims.layout) if dims.cp > 1 else "contiguous"
    masks = set()
    for rank in sorted({0, ring - 1}):
        for src in range(ring):
            for block in step_blocks(layout, n, ring, rank, src, True, m.window):
                masks.add((block.q1 - block.q0, block.k1 - block.k0, block.mask))
    if packs_documents(cfg.data):
        ids = torch.zeros(1, 1, dtype=torch.long)
        masks.add((n // ring, n // ring, Mask(q_doc=ids, k_doc=ids)))
    for rows, keys, mask in sorted(masks, key=repr):
        q, kv = Probe((1, rows, heads, width), dtype, device), Probe((1, keys, heads, width), dtype, device)
        why = backend.supports(q, kv, kv, mask)
        if why:
            return why
    return None


def memory_lower_bound(cfg, dims: ParallelDims) -> tuple[int, int]:
    """(bytes of the token batch, bytes of the saved residuals) one rank holds at least in a step: its data
    slice's whole sequences (input ids and labels, int64, before sharding), and one residual of its tokens
    per layer of its stage saved for backward (what even full activation checkpointing keeps; sequence
    parallelism splits it over tp), for one pipeline microbatch. A floor, not an estimate: the real
    step holds more (weights, optimizer state, attention, logits)."""
    t, p = cfg.train, cfg.parallel
    sequences = t.batch_size // dims.dp
    batch = sequences * t.seq_len * 8 * 2
    micro = max(1, sequences // t.accumulation // (n_microbatches(dims.pp, p.microbatches) if dims.pp > 1 else 1))
    tokens = micro * t.seq_len // dims.cp // dims.tp
    act_bytes = 2 if t.precision == "bf16" else 4
    return batch, -(-cfg.model.n_layers // dims.pp) * tokens * cfg.model.dim * act_bytes


def _ram_per_rank(local_ranks: int) -> tuple[int, str] | None:
    """(bytes, what) of RAM (the cgroup's limit when lower) each of this machine's ranks may use, or None."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        ram = min(ram, int(limit)) if limit.isdigit() else ram
    except OSError:
        pass
    return ram // max(1, local_ranks), f"{ram / 2**30:.1f} GiB of RAM over {local_ranks} rank(s)"


def _gib(n: float) -> str:
    gib = n / 2**30
    return f"{gib:.1f} GiB" if gib < 1e5 else f"{gib:.3g} GiB"


def _rank_memory(local_ranks: int) -> tuple[int, str] | None:
    """(bytes, what) one rank computes in: its GPU's memory, else its share of RAM."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory, "the memory of one GPU"
    return _ram_per_rank(local_ranks)


def check_eval_memory(model_cfg, *, rows: int, tokens: int, ranks: int, tp: int = 1, logits: bool = False,
                      what: str, local_ranks: int = 1) -> None:
    """A floor for evaluation and generation, checked before any rank starts (a request far beyond the
    machine is a one-line error, not the kernel's out-of-memory killer): `rows` sequences of `tokens`
    tokens split over `ranks` context ranks hold at least the K/V of every layer (a generation's cache,
    heads split over `tp`) and one layer's activations of the prefill, or for perplexity (`logits`) the fp32
    logits of a shard. Evaluation runs in fp32."""
    from ..config import head_dim_of
    from .metrics import hf_layers_of

    shard = rows * -(-tokens // ranks)
    if logits:
        need, part = shard * model_cfg.vocab_size * 4 // tp, "the fp32 logits of its shard"
    else:
        layers = hf_layers_of(model_cfg)  # each layer's K/V heads and widths (latent attention, Gemma 4)
        per_token = model_cfg.n_layers * max(1, model_cfg.n_kv_heads // tp) * 2 * head_dim_of(model_cfg) \
            if layers is None else sum(max(1, layer["kv_heads"] // tp) * (layer["qk_dim"] + layer["v_dim"])
                                       for layer in layers)
        # plus one layer's live activations while the prompt is prefilled: the residual stream and the queries,
        # and for longctx's own MLP its gate and up projections (an HF model's experts may run one at a time)
        queries = model_cfg.n_heads * (head_dim_of(model_cfg) if layers is None else
                                       max(layer["qk_dim"] for layer in layers)) // tp
        live = model_cfg.dim + queries + (2 * model_cfg.ffn_dim // tp if layers is None else 0)
        need = shard * (per_token + live) * 4
        part = "the K/V cache of every layer and one layer's activations"
    have = _rank_memory(local_ranks)
    if have is not None and need > have[0]:
        raise ConfigError(f"{what} needs at least {_gib(need)} on each rank ({part}), more than the "
                          f"{_gib(have[0])} each rank has here ({have[1]}); ask for fewer tokens, or spread "
                          "them over more ranks (--nproc, torchrun)")


def _check_memory(cfg, dims: ParallelDims, local_ranks: int) -> None:
    """The floor of memory_lower_bound against what a rank has: the token batch lives in RAM, the residuals
    on the rank's GPU (in RAM without one)."""
    import torch

    batch, residuals = memory_lower_bound(cfg, dims)
    needs = []  # (bytes needed, bytes there, where)
    ram = _ram_per_rank(local_ranks)
    if torch.cuda.is_available():
        needs.append((residuals, *_rank_memory(local_ranks)))
        if ram is not None:
            needs.append((batch, *ram))
    elif ram is not None:
        needs.append((batch + residuals, *ram))
    for need, have, where in needs:
        if need > have:
            raise ConfigError(
                f"train.seq_len={cfg.train.seq_len} x train.batch_size={cfg.train.batch_size} needs at least "
                f"{_gib(need)} on each rank (its token batch {_gib(batch)}, one saved residual per "
                f"layer {_gib(residuals)}), more than the {_gib(have)} each rank has here ({where}); "
                "shorten train.seq_len or train.batch_size, or spread them over more ranks (parallel.cp, data "
                "parallelism)")

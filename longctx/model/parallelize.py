"""Apply the parallel axes to a built model, torchtitan style: the model itself stays unaware.

`parallelize(model, dims, cfg)` applies, in this order (each step assumes the ones before it):

  1. pipeline split         the layers of this rank's stages (longctx.parallel.pipeline), each stage a copy
                            of the model with the other layers removed
  2. tensor parallel        DTensor plans over the tp ranks, per stage (longctx.parallel.tensor)
  3. context parallel       attention cores -> the strategy's sequence-parallel core over the cp ranks;
                            LongNet dilated cores -> distributed over the same cp ranks
  4. activation checkpoint  none | full (every block) | selective (every n-th block)
  5. data parallel          FSDP2 over dp_shard x cp, DDP over dp_replicate x cp, or HSDP (both), per stage;
                            DeepSpeed is applied by the trainer (it owns the optimizer)

and returns a Plan. The split comes before tensor parallelism (torchtitan applies TP first): a stage is a
deep copy of the model, and copying plain modules is cheaper and safer than copying DTensor parameters
with their redistribution hooks; the result is the same, since TP acts on each block alone. The plan is the
only source of the token layout: `plan.shard_batch` cuts a batch for this rank and the installed cores run
on that same layout, so data and attention cannot disagree.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ParallelConfig
from ..parallel.data_parallel import apply_data_parallel, resolve_engine, set_gradient_sync
from ..parallel.dims import ParallelDims, ParallelMesh
from ..parallel.pipeline import split_model, stage_ids, stage_layers, stages_per_rank
from ..parallel.sequence.api import ContextParallelAttention, check_positions
from ..parallel.sequence.balance import reorder_documents
from ..parallel.sequence.dilated import DilatedAttention
from ..parallel.sequence.documents import Documents
from ..parallel.sequence.registry import get_strategy
from ..parallel.tensor import apply_tensor_parallel, check_tp
from ..parallel.tied import TiedPipelineWeight, tied_pipeline_weight
from .llama import Block, LocalAttention

AC_MODES = ("none", "full", "selective")  # activation checkpointing: nothing, every block, every n-th block


@dataclass
class Plan:
    """What a parallelized model needs from the data path, and what the trainer needs from the mesh."""

    model: nn.Module  # the parallelized model; under pp > 1 a ModuleList of this rank's stages
    dims: ParallelDims
    mesh: ParallelMesh
    engine: str  # none | ddp | fsdp | hsdp | deepspeed
    stages: list = field(default_factory=list)  # pp > 1: this rank's stage modules, in stage order
    stage_ids: list = field(default_factory=list)
    n_stages: int = 1
    balance_documents: bool = False  # packed batches: reorder each sequence's documents for the cp ranks
    tied: TiedPipelineWeight | None = None  # pp > 1 with a tied output head: its two copies (parallel.tied)
    _positions: dict = field(default_factory=dict, repr=False)

    @property
    def strategy(self) -> str:
        return self.dims.strategy

    @property
    def layout(self) -> str:
        return self.dims.layout

    @property
    def cp_rank(self) -> int:
        return self.mesh.rank("cp")

    @property
    def dp_rank(self) -> int:
        """Which slice of the global batch this rank reads (context ranks of one sequence share it)."""
        return self.mesh.rank("dp")

    @property
    def loss_group(self):
        """Where real-label counts are summed and gradients reduced: data x context ranks (None if 1)."""
        return self.mesh.group("dp_cp")

    def materialize(self, device, seed: int) -> None:
        """Storage, then values, for a model parallelized on the meta device: each stage's parameters get
        this rank's pieces only (FSDP2 shards, tensor-parallel rows), so no rank ever holds the whole model.
        The values are the unsplit model's `init_weights(seed)`, whatever the layout: each parameter is
        drawn full-size on CPU, one at a time, and this rank keeps its piece (DTensor's own split, the one
        its placements describe, without communication: every rank drew the same value)."""
        for module in self.stages or [self.model]:
            module.to_empty(device=device)
            module.init_weights(seed, write=write_local_piece)

    def positions(self, seq_len: int, device=None) -> torch.Tensor:
        """Global positions (= RoPE position ids) of this rank's tokens of a seq_len-token sequence. One
        tensor per (length, device), reused: the model's position check then runs once, not every step."""
        key = (seq_len, str(torch.device(device or "cpu")))
        if key not in self._positions:
            self._positions[key] = self.expected_positions(seq_len).to(device or "cpu")
        return self._positions[key]

    def expected_positions(self, seq_len: int) -> torch.Tensor:
        """A fresh copy of this rank's positions (what handed-out ids are checked against)."""
        if self.dims.cp == 1:
            return torch.arange(seq_len)
        return get_strategy(self.strategy).rank_positions(self.layout, seq_len, self.dims.cp, self.cp_rank,
                                                          self.dims.ulysses)

    def shard_batch(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                    doc_ids: torch.Tensor | None = None) -> dict:
        """This rank's part of a (batch, seq) token batch: input ids, labels (shifted in natural order before
        sharding: a shard's last target lives on another rank in most layouts) and position ids; with
        `doc_ids` (batch, seq) of packed documents, also `documents` (the same on every rank, for the model:
        attention stays inside each document and RoPE restarts at each)."""
        n = input_ids.shape[1]
        self.dims.check_seq_len(n, what="sequence length (input_ids.shape[1])")
        if doc_ids is not None and doc_ids.shape != input_ids.shape:
            raise ValueError(f"doc_ids {tuple(doc_ids.shape)} must have the shape of input_ids "
                             f"{tuple(input_ids.shape)}: one document id per token, unsharded")
        if doc_ids is not None and self.balance_documents and self.dims.cp > 1 and self.strategy != "ulysses":
            # whole documents move, labels with their tokens: no output, loss or gradient changes
            ring = self.dims.cp // (self.dims.ulysses if self.strategy == "hybrid" else 1)
            doc_ids, input_ids, *rest = reorder_documents(doc_ids, self.layout, ring, input_ids,
                                                          *([labels] if labels is not None else []))
            labels = rest[0] if rest else None
        pos = self.positions(n, input_ids.device)
        out = {"input_ids": input_ids.index_select(1, pos), "position_ids": pos}
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels {tuple(labels.shape)} must have the shape of input_ids "
                                 f"{tuple(input_ids.shape)} (shift them before sharding)")
            out["labels"] = labels.index_select(1, pos)
        if doc_ids is not None:
            out["documents"] = Documents.from_ids(doc_ids)
        return out

    def set_gradient_sync(self, enabled: bool) -> None:
        for module in self.stages or [self.model]:
            set_gradient_sync(module, self.engine, enabled)

    @property
    def pp_group(self):
        return self.mesh.group("pp")


def _swap_cores(model: nn.Module, mesh: ParallelMesh, kernel: str) -> None:
    dims = mesh.dims
    dilated, swapped = [], 0
    for module in model.modules():
        core = getattr(module, "core", None)
        if isinstance(core, LocalAttention):
            core.kernel = kernel
            if dims.cp > 1:
                module.core = ContextParallelAttention(dims.strategy, mesh.cp_group(), causal=core.causal,
                                                       kernel=kernel, window=core.window, layout=dims.layout,
                                                       check_positions=False)
                swapped += 1
        elif isinstance(core, DilatedAttention):
            core.kernel = kernel
            dilated.append(core)
        elif isinstance(core, ContextParallelAttention):
            raise ValueError("this model is already parallelized; parallelize a freshly built model")
    if dilated and dims.cp > 1:
        problem = dilated_layout_problem(dims)
        if problem:
            raise ValueError(f"the model's LongNet dilated layers {problem}")
        for core in dilated:
            core.group = mesh.cp.get_group()


def _check_positions_hook(positions_of, cp: int):
    """One position check per forward, not per layer; `positions_of(n)` gives this rank's positions of an
    n-token sequence. The plan hands out one tensor per length: once that very tensor (held here, so its
    identity cannot be reused by another) has been checked and not modified since, later forwards skip the
    check, so there is no host sync per step. Any other tensor is checked every time."""
    checked = {}  # n -> (the checked tensor itself, its version counter then)

    def hook(module, args, kwargs):
        tokens = args[0] if args else kwargs.get("tokens")
        pos = args[1] if len(args) > 1 else kwargs.get("position_ids")
        if pos is None:
            raise ValueError("a context-parallel model needs position_ids: take input_ids and position_ids from "
                             "plan.shard_batch(...)")
        n = tokens.shape[1] * cp
        seen = checked.get(n)
        if seen is not None and seen[0] is pos and seen[1] == pos._version:
            return
        check_positions(pos, positions_of(n))
        checked[n] = (pos, pos._version)

    return hook


def apply_context_parallel(model: nn.Module, strategy: str = "zigzag", group=None, *, kernel: str | None = None,
                           layout: str | None = None, rope_length: int | None = None) -> str:
    """Swap every LocalAttention core for `strategy` over `group` (a process group, None = world, or a
    ("ring", "ulysses") mesh for hybrid) without a mesh or data parallelism; returns the token layout the
    batch must be sharded with (longctx.parallel.shard_batch). Training goes through `parallelize`.
    rope_length: an HF model's self-rescaling RoPE is pinned to it (see hf.pin_rope_length); without it such
    a RoPE is refused over more than one rank."""
    from ..parallel.comm import Comm
    from ..parallel.sequence.mesh import hybrid_groups

    strat = get_strategy(strategy)
    layout = strat.layout(layout)
    if hasattr(model, "hf"):  # an HFCausalLM: its attention modules call longctx through the AttentionInterface
        from .hf import check_hf_rope, pin_rope_length, prepare_attention

        if strategy == "hybrid":
            raise ValueError("a Hugging Face model takes a process group here, and strategy='hybrid' needs a (ring, "
                             "ulysses) mesh; use ulysses, allgather or a ring-family strategy")
        world = Comm.get(group).world
        if rope_length is None:
            check_hf_rope(model.hf.config, world, "the group size")
        else:
            pin_rope_length(model.hf, rope_length)
        prepare_attention(model.hf, strategy, group, layout, kernel or "auto", world)
        return layout
    if strategy == "hybrid":
        ug, rg, _ = hybrid_groups(group)
        uc, rc = Comm.get(ug), Comm.get(rg)
        world, rank, ulysses = uc.world * rc.world, rc.rank * uc.world + uc.rank, uc.world
    else:
        comm = Comm.get(group)
        world, rank, ulysses = comm.world, comm.rank, 1
    swapped = 0
    for module in model.modules():
        core = getattr(module, "core", None)
        if isinstance(core, LocalAttention):
            module.core = ContextParallelAttention(strategy, group, causal=core.causal, kernel=kernel or core.kernel,
                                                   window=core.window, layout=layout, check_positions=False)
            swapped += 1
        elif isinstance(core, DilatedAttention):
            if strategy == "hybrid" or layout != "contiguous":
                raise ValueError("dilated layers need a contiguous split over one group: use strategy='ring' "
                                 "here, or longctx.model.parallelize with a contiguous layout")
            core.group = group
    if not swapped:
        raise ValueError("apply_context_parallel found no LocalAttention cores to replace (already applied?)")
    model._longctx_cp_check = model.register_forward_pre_hook(_check_positions_hook(
        lambda n: strat.rank_positions(layout, n, world, rank, ulysses), world), with_kwargs=True)
    return layout


@contextlib.contextmanager
def context_parallel(model: nn.Module, strategy: str = "zigzag", group=None, *, rope_length: int | None = None):
    """apply_context_parallel for the length of a `with` block (yields the layout): the model comes back as it
    went in (its attention cores and no position check; an HF model's attention routing), so it can be
    evaluated again, on other data or over another group."""
    if hasattr(model, "hf"):
        from .hf import attention_modules

        implementation = model.hf.config._attn_implementation
        saved = [(m, getattr(m, "_longctx_cores", None)) for m in attention_modules(model.hf)]
    else:
        saved = [(m, m.core) for m in model.modules() if isinstance(getattr(m, "core", None), LocalAttention)]
    try:
        yield apply_context_parallel(model, strategy, group, rope_length=rope_length)
    finally:
        if hasattr(model, "hf"):
            for m, cores in saved:
                m._longctx_cores = cores
            if model.hf.config._attn_implementation != implementation:
                model.hf.set_attn_implementation(implementation)
        else:
            for m, core in saved:
                m.core = core
            check = model.__dict__.pop("_longctx_cp_check", None)
            if check is not None:
                check.remove()


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 2, blocks=None) -> int:
    """Recompute blocks in backward instead of saving their activations; returns how many blocks.
    `blocks`: the modules to checkpoint (default: the model's longctx Blocks)."""
    from torch.distributed._composable import checkpoint

    if mode not in AC_MODES:
        raise ValueError(f"parallel.activation_checkpoint={mode!r}: choose one of {', '.join(AC_MODES)}")
    if mode == "selective" and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"parallel.ac_every must be a positive int (checkpoint every n-th block), got {every!r}")
    done = 0
    if blocks is None:
        blocks = [b for b in model.modules() if isinstance(b, Block)]
    for i, block in enumerate(blocks):
        if mode == "full" or (mode == "selective" and i % every == 0):
            checkpoint(block)
            done += 1
    return done


def dilated_layout_problem(dims: ParallelDims) -> str | None:
    """LongNet layers split the sequence contiguously over the cp ranks, so the layout must be contiguous:
    what is wrong (to follow the name of the layers) or None."""
    if dims.cp > 1 and dims.layout != "contiguous":
        return (f"need the contiguous token layout, but parallel.strategy={dims.strategy} runs on {dims.layout!r}; "
                "use parallel.strategy=ring, or allgather/ulysses/hybrid with parallel.layout=contiguous")
    return None


def write_local_piece(param: torch.Tensor, full: torch.Tensor) -> None:
    """Store this rank's piece of `full` into `param` (a DTensor: its local shard; a plain tensor: all)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    full = full.to(param.device, param.dtype)
    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def parallelize(model: nn.Module, dims: ParallelDims, cfg=None, *, mesh: ParallelMesh | None = None,
                param_dtype=None) -> Plan:
    """Apply the pipeline split, tensor, context and data parallelism and activation checkpointing (in the
    order of the module docstring) to `model` over the mesh of `dims`; `cfg` is the `parallel` config section
    (or a job config holding one). Under pp > 1 the trainer builds the schedule from the plan's stages."""
    cfg = getattr(cfg, "parallel", cfg) or ParallelConfig()
    cfg_model = getattr(model, "cfg", None)
    if cfg_model is not None:
        dims.check_heads(cfg_model.n_heads, cfg_model.n_kv_heads)
        check_tp(cfg_model.n_heads, cfg_model.n_kv_heads, cfg_model.vocab_size, dims.tp, cfg_model.ffn_dim)
    mesh = mesh or dims.build_mesh()
    engine = resolve_engine(cfg.engine, dims)
    modules, ids, n_stages = pipeline_stages(model, len(model.layers), dims, cfg, mesh)
    for module in modules:
        if dims.tp > 1:
            apply_tensor_parallel(module, mesh.tp)
        _swap_cores(module, mesh, cfg.kernel)
        apply_activation_checkpointing(module, cfg.activation_checkpoint, cfg.ac_every)
        if engine != "deepspeed":
            apply_data_parallel(module, mesh, engine, reshard_after_forward=cfg.reshard_after_forward,
                                param_dtype=param_dtype, keep_root_unsharded=dims.pp > 1 and module.output is not None)
    return assemble_plan(model, modules, ids, n_stages, dims, mesh, engine, cfg)


def pipeline_stages(model: nn.Module, n_layers: int, dims: ParallelDims, cfg, mesh: ParallelMesh):
    """(this rank's stage modules, their stage ids, the number of stages): the model itself at pp=1."""
    if dims.pp == 1:
        return [model], [], 1
    per_rank = stages_per_rank(cfg.pp_schedule, cfg.pp_virtual)
    n_stages = dims.pp * per_rank
    ids = stage_ids(mesh.rank("pp"), dims.pp, per_rank, cfg.pp_schedule)
    ranges = stage_layers(n_layers, n_stages, cfg.pp_split)
    return [split_model(model, ranges[i], first=i == 0, last=i == n_stages - 1) for i in ids], ids, n_stages


def assemble_plan(model: nn.Module, modules: list, ids: list, n_stages: int, dims: ParallelDims,
                  mesh: ParallelMesh, engine: str, cfg) -> Plan:
    """The Plan of parallelized `modules` (this rank's stages, or [model]); under cp the module that sees
    token ids (the first stage) checks their positions."""
    container = nn.ModuleList(modules) if dims.pp > 1 else model
    plan = Plan(container, dims, mesh, engine, modules if dims.pp > 1 else [], ids, n_stages,
                balance_documents=cfg.balance_documents)
    tied = getattr(model, "tied_head", lambda: None)() if dims.pp > 1 else None
    if tied is not None:  # (embedding, head) names in the model, which its stage modules keep
        per_rank = stages_per_rank(cfg.pp_schedule, cfg.pp_virtual)
        owner = next(r for r in range(dims.pp) if n_stages - 1 in stage_ids(r, dims.pp, per_rank, cfg.pp_schedule))
        plan.tied = tied_pipeline_weight(modules, ids, n_stages, tied, mesh.world, owner)
    first = modules[ids.index(0)] if 0 in ids else (model if dims.pp == 1 else None)
    if dims.cp > 1 and first is not None:
        first.register_forward_pre_hook(_check_positions_hook(plan.expected_positions, dims.cp), with_kwargs=True)
    return plan

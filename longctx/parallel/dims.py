"""ParallelDims: the degrees of every parallel axis, validated once, and the one DeviceMesh they build.

World mesh dimensions, outermost first (the fixed order every other module relies on):

    pp  x  dp_replicate  x  dp_shard  x  cp  x  tp

tp is innermost so its frequent collectives stay between neighbouring ranks (one node); cp next, for the
same reason (Ulysses all-to-alls, ring hops); data parallel outside, pipeline outermost. For the hybrid
strategy the cp dimension is split again into ("ring", "ulysses"), ulysses inner.

Flattened meshes the rest of the system needs (all built once, in the same order on every rank):

    dp_cp       dp_replicate x dp_shard x cp   gradients are summed and the loss count is reduced here:
                                               context ranks hold different tokens of the same sequences
    dp          dp_replicate x dp_shard        which sequences a rank reads
    fsdp        dp_shard x cp                  FSDP2 shards parameters over it
    hsdp        (dp_replicate, dp_shard x cp)  2-D mesh for HSDP (replicate outer, shard inner): when both > 1,
                                               or dp_replicate > 1 with tp or pp (FSDP2 then replicates over a
                                               shard dimension of size 1, since DDP composes with neither)
    tp          tp                             the tensor-parallel mesh; taken from the HSDP mesh's root when
                                               there is one, since FSDP2 requires its mesh and a DTensor
                                               parameter's to share a root
    ddp         dp_replicate x cp              DDP all-reduces over it (when dp_shard == 1)
    cp_hybrid   (ring, ulysses)                hybrid strategy only

No globals: `build_mesh` returns a ParallelMesh that callers pass along. Dims of size 1 add no work: no
wrapper, no collective is applied for them (the mesh still names them, so code never branches on names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .sequence.registry import get_strategy
from .timeouts import match_world_timeout

DIM_NAMES = ("pp", "dp_replicate", "dp_shard", "cp", "tp")


def _is_degree(value, allow_rest: bool) -> bool:
    if isinstance(value, bool) or not isinstance(value, int):
        return False
    return value >= 1 or (allow_rest and value == -1)


@dataclass
class ParallelDims:
    """Degrees of each axis; -1 (at most one) takes the rest of the world.

    cp: ranks that share one sequence; `strategy` says how attention runs over them, and for 'hybrid'
    `ulysses` of those cp ranks form the Ulysses part (cp = ring x ulysses).
    """

    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    world_size: int = 1
    strategy: str = "zigzag"
    ulysses: int = 1
    layout: str | None = None  # None: the strategy's default layout

    def __post_init__(self):
        names = ("dp_replicate", "dp_shard", "cp", "tp", "pp")
        for name in names:
            if not _is_degree(getattr(self, name), allow_rest=True):
                raise ValueError(f"parallel.{name} must be a positive int or -1 (the rest of the world), got "
                                 f"{getattr(self, name)!r}")
        if not _is_degree(self.world_size, allow_rest=False):
            raise ValueError(f"world size must be a positive int, got {self.world_size!r}")
        if not _is_degree(self.ulysses, allow_rest=False):
            raise ValueError(f"parallel.ulysses must be a positive int, got {self.ulysses!r}")
        rest = [n for n in names if getattr(self, n) == -1]
        if len(rest) > 1:
            raise ValueError(f"at most one parallel degree may be -1 (the rest of the world); got -1 for "
                             f"{' and '.join('parallel.' + n for n in rest)}: give all but one explicitly")
        fixed = math.prod(getattr(self, n) for n in names if getattr(self, n) != -1)
        if rest:
            if self.world_size % fixed:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by the product of the other degrees ({fixed} ="
                    f" {self._product_text(exclude=rest[0])}), so parallel.{rest[0]}=-1 has no integer value; "
                    f"use a world size that is a multiple of {fixed} or change the degrees")
            setattr(self, rest[0], self.world_size // fixed)
        elif fixed != self.world_size:
            raise ValueError(
                f"the parallel degrees multiply to {fixed} ({self._product_text()}) but the world size is "
                f"{self.world_size}; make the product equal the world size, or set one degree to -1 to take "
                f"the rest")
        strat = get_strategy(self.strategy)
        self.layout = strat.layout(self.layout)
        if self.strategy == "hybrid":
            if self.cp % self.ulysses:
                raise ValueError(f"parallel.ulysses={self.ulysses} does not divide parallel.cp={self.cp}: hybrid "
                                 f"runs cp = ring x ulysses ranks; pick a ulysses degree that divides {self.cp}")
        elif self.ulysses != 1:
            raise ValueError(f"parallel.ulysses={self.ulysses} only applies to parallel.strategy=hybrid (got "
                             f"{self.strategy!r}); set parallel.ulysses=1, or strategy=hybrid")

    def _product_text(self, exclude: str | None = None) -> str:
        return " x ".join(f"{n}={getattr(self, n)}" for n in ("pp", "dp_replicate", "dp_shard", "cp", "tp")
                          if n != exclude)

    # ------------------------------------------------------------------ derived degrees
    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks read different sequences."""
        return self.dp_replicate * self.dp_shard

    @property
    def dp_cp(self) -> int:
        """Ranks over which gradients are summed and the loss count is reduced."""
        return self.dp * self.cp

    @property
    def ring(self) -> int:
        return self.cp // self.ulysses

    def seq_divisor(self) -> int:
        """The training sequence length must be a multiple of this (the strategy's layout over cp ranks)."""
        return get_strategy(self.strategy).seq_divisor(self.cp, self.layout, self.ulysses) if self.cp > 1 else 1

    def check_seq_len(self, seq_len: int, what: str = "train.seq_len") -> None:
        if self.cp > 1:
            get_strategy(self.strategy).check(seq_len=seq_len, world=self.cp, layout=self.layout,
                                              ulysses=self.ulysses, what=what)

    def check_heads(self, heads: int, kv_heads: int) -> None:
        """Heads split by tp (later) and, for ulysses/hybrid, by the Ulysses degree."""
        if self.tp > 1 and heads % self.tp:
            raise ValueError(f"model.n_heads={heads} is not divisible by parallel.tp={self.tp}; choose a tp degree "
                             f"that divides the heads")
        if self.cp > 1:
            try:
                get_strategy(self.strategy).check(seq_len=None, world=self.cp, layout=self.layout,
                                                  heads=heads // self.tp, kv_heads=max(1, kv_heads // self.tp),
                                                  ulysses=self.ulysses)
            except ValueError as e:
                if self.tp == 1:  # the keys to change, before the strategy's own words
                    degree = f", parallel.ulysses={self.ulysses}" if self.strategy == "hybrid" else ""
                    raise ValueError(f"model.n_heads={heads} with parallel.cp={self.cp}{degree}: {e}") from None
                raise ValueError(f"model.n_heads={heads} / parallel.tp={self.tp} = {heads // self.tp} heads per "
                                 f"tensor-parallel rank: {e}") from None

    def build_mesh(self, device_type: str | None = None) -> ParallelMesh:
        """The world DeviceMesh and its flattened sub-meshes (collective: every rank calls it, same order)."""
        return ParallelMesh(self, device_type)


def device_type_from_env() -> str:
    """cuda when this process has a GPU and the default group can move CUDA tensors, else cpu."""
    if not torch.cuda.is_available():
        return "cpu"
    if dist.is_initialized() and "nccl" not in str(dist.get_backend()).lower():
        return "cpu"
    return "cuda"


class ParallelMesh:
    """The world mesh plus the flattened meshes, each built once and kept (not re-sliced from the root)."""

    def __init__(self, dims: ParallelDims, device_type: str | None = None):
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError("building the device mesh needs an initialised process group (torchrun, "
                               "longctx launch local, or longctx.launch.run)")
        if dist.get_world_size() != dims.world_size:
            raise ValueError(f"ParallelDims was validated for world size {dims.world_size} but the process group "
                             f"has {dist.get_world_size()} ranks; build ParallelDims(world_size="
                             f"{dist.get_world_size()}, ...)")
        self.dims = dims
        self.device_type = device_type or device_type_from_env()
        shape = tuple(getattr(dims, n) for n in DIM_NAMES)
        self.world = init_device_mesh(self.device_type, shape, mesh_dim_names=DIM_NAMES)
        w = self.world
        self.dp_cp = w["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        self.dp = w["dp_replicate", "dp_shard"]._flatten("dp")
        self.fsdp = w["dp_shard", "cp"]._flatten("fsdp")
        self.ddp = w["dp_replicate", "cp"]._flatten("ddp")
        self.cp = w["cp"]
        # The two 2-D meshes regroup a dimension, which slicing cannot do; each comes from a second mesh over
        # the same ranks with that dimension split or merged (public API, same rank order), built only when
        # the job needs it.
        pp, rep, shard, cp, tp = shape
        self.hsdp = None
        self.tp = w["tp"]
        if rep > 1 and (shard * cp > 1 or tp > 1 or pp > 1):
            names = ("pp", "dp_replicate", "dp_shard_cp", "tp")
            hsdp_root = init_device_mesh(self.device_type, (pp, rep, shard * cp, tp), mesh_dim_names=names)
            self.hsdp = hsdp_root["dp_replicate", "dp_shard_cp"]
            self.tp = hsdp_root["tp"]  # same ranks as w["tp"]; FSDP2 checks that dp and tp share a root
        self.cp_hybrid = None
        if dims.strategy == "hybrid":
            names = ("pp", "dp_replicate", "dp_shard", "ring", "ulysses", "tp")
            self.cp_hybrid = init_device_mesh(self.device_type, (pp, rep, shard, dims.ring, dims.ulysses, tp),
                                              mesh_dim_names=names)["ring", "ulysses"]
        match_world_timeout()  # the sub-groups torch made: parallel.timeout_s, not torch's 30 minutes

    def rank(self, name: str) -> int:
        """This rank's coordinate along a world dimension or a flattened mesh."""
        mesh = self.world[name] if name in DIM_NAMES else getattr(self, name)
        return mesh.get_local_rank()

    def group(self, name: str):
        """The process group of a 1-D mesh, or None when it has one rank (nothing to communicate)."""
        mesh = self.world[name] if name in DIM_NAMES else getattr(self, name)
        return mesh.get_group() if mesh.size() > 1 else None

    def cp_group(self):
        """What the context-parallel cores take as `group`: the cp mesh, or (ring, ulysses) for hybrid."""
        return self.cp_hybrid if self.cp_hybrid is not None else self.cp

    def __repr__(self) -> str:
        return f"ParallelMesh({dict(zip(DIM_NAMES, self.world.shape))}, device_type={self.device_type!r})"

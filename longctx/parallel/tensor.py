"""Tensor parallelism for the Llama blocks, with DTensor's `parallelize_module`, and the vocabulary-parallel
loss that goes with it.

Per block (Megatron-style with sequence parallelism; activations between blocks are sharded on the
sequence over the tp ranks, so norms and residuals cost 1/tp):

  attention_norm, ffn_norm   SequenceParallel            (B, S/tp, D) in and out
  attention, feed_forward    input Shard(1) -> Replicate  one all-gather of the normed activations
  wq, wk, wv, w1, w3         ColwiseParallel              this rank's heads / hidden units
  wo, w2                     RowwiseParallel -> Shard(1)  one reduce-scatter back to the sequence shards
  tok_embeddings             RowwiseParallel (vocab rows) -> Shard(1)
  norm                       SequenceParallel
  output                     ColwiseParallel (vocab rows), logits Shard(-1) for the logits path

Attention then sees this rank's n_heads/tp query and n_kv_heads/tp K/V heads for the context-parallel
rank's whole shard (with tp > n_kv_heads, one K/V head shared by tp/n_kv_heads ranks: `KVHeadLinear`),
and the sequence-parallel schedule runs over the cp ranks on those heads. The loss never materialises
full logits: `vocab_parallel_cross_entropy` computes each chunk's logits for this rank's vocabulary rows
only and combines the log-sum-exp over tp ranks with two small all-reduces (counted by the Comm of the tp
group, phase "tp"); the hidden-state gradient is reduce-scattered back to the shards.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.softcap import soft_cap
from .comm import Comm

PHASE = "tp"


class TpMisfit(NamedTuple):
    """Why a model's sizes do not split over tp ranks: the fact (naming the tp option as the caller spells it, `tp_as`),
    the reason, and training's fix (a tp degree, or a size to change)."""

    fact: str
    why: str
    fix: str

    def __str__(self) -> str:
        return f"{self.fact}: {self.why}; {self.fix}"


def tp_misfit(n_heads: int, n_kv_heads: int, vocab_size: int, tp: int, ffn_dim: int | None = None, *,
              tp_as: str = "parallel.tp={}") -> TpMisfit | None:
    """The first constraint of splitting the model over `tp` ranks that its sizes break, or None."""
    if tp == 1:
        return None
    if ffn_dim is not None and ffn_dim % tp:  # w1/w3 split by columns, w2 by rows: DTensor would fail mid-forward
        return TpMisfit(f"model.ffn_dim={ffn_dim} is not divisible by {tp_as.format(tp)}",
                        "each tensor-parallel rank takes ffn_dim/tp of the MLP's hidden units",
                        f"use a multiple of {tp} (e.g. {ffn_dim + (-ffn_dim) % tp}) or a tp degree that divides "
                        f"{ffn_dim}")
    if n_heads % tp:
        return TpMisfit(f"model.n_heads={n_heads} is not divisible by {tp_as.format(tp)}",
                        "each tensor-parallel rank takes n_heads/tp query heads",
                        f"choose a tp degree that divides {n_heads}")
    if n_kv_heads % tp and tp % n_kv_heads:
        return TpMisfit(f"model.n_kv_heads={n_kv_heads} and {tp_as.format(tp)} do not divide one another",
                        "each tensor-parallel rank takes n_kv_heads/tp K/V heads, or with tp > n_kv_heads shares one "
                        "with tp/n_kv_heads ranks, so one must divide the other",
                        f"choose a tp degree that divides {n_kv_heads} or is a multiple of it (and divides "
                        f"model.n_heads={n_heads})")
    if vocab_size % tp:
        return TpMisfit(f"model.vocab_size={vocab_size} is not divisible by {tp_as.format(tp)}",
                        "the embedding and output rows are split over tp", f"pad the vocabulary to a multiple of {tp}")
    return None


def check_tp(n_heads: int, n_kv_heads: int, vocab_size: int, tp: int, ffn_dim: int | None = None) -> None:
    """Every constraint of splitting the model over tp ranks; messages name the key and the fix."""
    misfit = tp_misfit(n_heads, n_kv_heads, vocab_size, tp, ffn_dim)
    if misfit:
        raise ValueError(str(misfit))


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard `model` (a longctx Transformer, or a pipeline stage of one) over the 1-D `tp_mesh` in place."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    top = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        top["norm"] = SequenceParallel(use_local_output=True)  # a plain tensor: what a pipeline stage can send
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)
    tp = tp_mesh.size()
    for block in model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers:
        attention = block.attention
        shared_kv = attention.n_kv < tp  # check_tp: then tp is a multiple of n_kv
        if shared_kv:
            head = tp_mesh.get_local_rank() // (tp // attention.n_kv)  # the K/V head of this rank's query heads
            rows = slice(head * attention.head_dim, (head + 1) * attention.head_dim)
            attention.wk = KVHeadLinear(attention.wk, tp_mesh, rows)
            attention.wv = KVHeadLinear(attention.wv, tp_mesh, rows)
        kv = {} if shared_kv else {"attention.wk": ColwiseParallel(), "attention.wv": ColwiseParallel()}
        parallelize_module(block, tp_mesh, {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(input_layouts=(Shard(1), None), desired_input_layouts=(Replicate(), None)),
            "attention.wq": ColwiseParallel(),
            **kv,
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
        })


class KVHeadLinear(nn.Linear):
    """wk / wv when parallel.tp > model.n_kv_heads: each K/V head then serves the tp/n_kv_heads ranks that
    hold its query heads (Megatron's replicated K/V heads). The weight is replicated over tp and each rank
    projects onto its one head, rows `rows` of the weight, so no rank computes heads it does not use. A
    rank's weight gradient covers only those rows and its input gradient only that head's share: both
    are Partial over tp, summed where DTensor reduces them (in the optimizer's norm, or before FSDP2's
    reduce-scatter), as for the norm weights under sequence parallelism. Still an nn.Linear, so
    init_weights and the state dict see `weight` where they expect it."""

    def __init__(self, linear: nn.Linear, tp_mesh, rows: slice):
        from torch.distributed.tensor import Replicate, distribute_tensor

        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # every rank holds the same weight (seeded init, or the meta device): nothing to broadcast
        self.weight = nn.Parameter(distribute_tensor(linear.weight.detach(), tp_mesh, [Replicate()],
                                                     src_data_rank=None),
                                   requires_grad=linear.weight.requires_grad)
        self.register_parameter("bias", None)
        self.rows = rows

    def forward(self, x):
        from torch.distributed.tensor import DTensor, Partial

        weight = self.weight.to_local(grad_placements=[Partial()])[self.rows]
        if isinstance(x, DTensor):  # the attention input, all-gathered (Replicate)
            x = x.to_local(grad_placements=[Partial()])
        return F.linear(x, weight)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rows={self.rows.start}:{self.rows.stop} on this tp rank"


# ------------------------------------------------------------------ inference on this rank's pieces
# A decode step runs one token per row: too short to shard over tp ranks, so generation computes with the
# local pieces directly (Megatron's inference split): colwise projections give this rank's heads / hidden
# units, rowwise ones a partial sum that one all-reduce of (B, 1, dim) completes, and the vocabulary rows
# of the embedding and the output are combined by an all-reduce and an all-gather.
def local_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def local_linear(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """x times this rank's piece of a Linear split by apply_tensor_parallel (or a whole Linear)."""
    weight = local_tensor(linear.weight)
    return F.linear(x, weight[linear.rows] if isinstance(linear, KVHeadLinear) else weight)


def tp_comm(weight: torch.Tensor) -> Comm | None:
    """The Comm of the tp mesh a model's `weight` was split over (apply_tensor_parallel, or
    apply_hf_tensor_parallel); None for a whole one. A model split any other way (FSDP shards) is refused:
    its pieces are not what a forward can use."""
    from torch.distributed.tensor import DTensor

    if not isinstance(weight, DTensor):
        return None
    mesh = weight.device_mesh
    if mesh.mesh_dim_names != ("tp",):
        raise ValueError(f"this model's weights are DTensors over the {mesh.mesh_dim_names} mesh: generation takes "
                         "whole weights or a tensor-parallel split (apply_tensor_parallel over a 'tp' mesh), not "
                         "FSDP/HSDP shards; load the weights unsharded (longctx.eval.load_checkpoint_model)")
    return Comm.get(mesh)


def vocab_parallel_embedding(embedding: nn.Embedding, ids: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Embedding rows split by vocabulary over tp: each rank looks up the ids it holds, one all-reduce."""
    weight = local_tensor(embedding.weight)
    rows = weight.shape[0]
    local_ids = ids - comm.rank * rows
    own = (local_ids >= 0) & (local_ids < rows)
    out = F.embedding(torch.where(own, local_ids, torch.zeros_like(local_ids)), weight)
    return comm.all_reduce(out.masked_fill(~own[..., None], 0), phase=PHASE)


def vocab_parallel_logits(output: nn.Linear, hidden: torch.Tensor, comm: Comm) -> torch.Tensor:
    """Logits over the whole vocabulary from output rows split over tp: one all-gather of (B, vocab/tp)."""
    return torch.cat(comm.all_gather(local_linear(output, hidden), phase=PHASE), dim=-1)


# ------------------------------------------------------------------------------------ vocab-parallel loss
def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _split_vocab_terms(logits, labels, vocab_start: int, comm: Comm, ignore_index: int):
    """Cross-entropy of (tokens, vocab / tp) logits, this rank's columns starting at vocab_start, against
    labels over the whole vocabulary: an all-reduce MAX of the row maxima and one all-reduce SUM of (sum of
    exp, target logit). Returns per-token losses (0 where ignored) and the pieces the gradient needs."""
    valid = labels != ignore_index
    local_t = labels - vocab_start
    own = valid & (local_t >= 0) & (local_t < logits.shape[-1])
    idx = torch.where(own, local_t, torch.zeros_like(local_t))[:, None]
    m = comm.all_reduce(logits.amax(dim=-1), phase=PHASE, op="max")
    e = torch.exp(logits - m[:, None])
    picked = torch.where(own, logits.gather(1, idx)[:, 0], torch.zeros_like(m))
    sums = comm.all_reduce(torch.stack([e.sum(-1), picked]), phase=PHASE)
    losses = torch.where(valid, m + sums[0].log() - sums[1], torch.zeros_like(m))
    return losses, e, sums[0], own, idx, valid


def vocab_parallel_token_losses(logits, labels, *, ignore_index: int) -> torch.Tensor:
    """Per-token cross-entropy (float32 or float64, 0 at ignored labels) of logits that are a DTensor split by
    vocabulary over a 'tp' mesh (Shard(-1): what the tensor-parallel model returns without labels)."""
    from torch.distributed.tensor import Shard

    mesh = logits.device_mesh
    split = logits.placements[0] if len(logits.placements) == 1 else None
    if mesh.mesh_dim_names != ("tp",) or not isinstance(split, Shard) or split.dim % logits.dim() != logits.dim() - 1:
        raise ValueError(f"expected logits split by vocabulary over the 'tp' mesh, got {logits.placements} over "
                         f"{mesh.mesh_dim_names}")
    comm = Comm.get(mesh)
    local = logits.to_local()
    rows = local.shape[-1]
    flat = local.reshape(-1, rows).to(_acc(local.dtype))
    losses = _split_vocab_terms(flat, labels.reshape(-1), comm.rank * rows, comm, ignore_index)[0]
    return losses.view(labels.shape)


class _VocabParallelCE(torch.autograd.Function):
    """Summed cross-entropy over real labels with the output rows split over tp ranks, one token chunk at a
    time: per chunk an all-reduce MAX of the row maxima and one all-reduce SUM of (sum of exp, target logit).
    The gradient w.r.t. the hidden states is this rank's partial sum; the caller marks it Partial, so DTensor
    reduce-scatters it back to the sequence shards (half the bytes of an all-reduce)."""

    @staticmethod
    def forward(ctx, hidden, w_local, labels, vocab_start: int, comm: Comm, chunk: int, ignore_index: int,
                want: bool, softcap):
        acc = _acc(hidden.dtype)
        n = hidden.shape[0]
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if want else None
        grad_w = torch.zeros(w_local.shape, dtype=acc, device=w_local.device) if want else None
        step = chunk if chunk > 0 else max(n, 1)
        for s0 in range(0, n, step):
            h, y = hidden[s0:s0 + step], labels[s0:s0 + step]
            logits = (h @ w_local.t()).to(acc)  # (chunk, vocab / tp): the only vocab-sized tensor
            slope = None
            if softcap is not None:  # elementwise, so each rank caps its own columns
                logits, slope = soft_cap(logits, softcap)
            losses, e, denom, own, idx, valid = _split_vocab_terms(logits, y, vocab_start, comm, ignore_index)
            total += losses.sum()
            if want:
                probs = e.div_(denom[:, None])  # softmax over the whole vocabulary, this rank's columns
                probs.scatter_add_(1, idx, -own.to(acc)[:, None])  # minus one-hot where this rank owns the target
                probs.mul_(valid[:, None].to(acc))
                if slope is not None:
                    probs.mul_(slope)
                grad_h[s0:s0 + step] = probs @ w_local.to(acc)
                grad_w += probs.t() @ h.to(acc)
        if want:
            ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (hidden.dtype, w_local.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return ((grad_h * grad_total).to(ctx.dtypes[0]), (grad_w * grad_total).to(ctx.dtypes[1]),
                None, None, None, None, None, None, None)


def vocab_parallel_cross_entropy(hidden, weight, labels, *, ignore_index: int, chunk: int = 1024,
                                 softcap: float | None = None) -> torch.Tensor:
    """Sum over real labels of cross_entropy(hidden @ weight.T, labels) where `weight` is the output
    projection as a DTensor sharded by rows (vocabulary) over a 1-D tp mesh and `hidden` (B, S, D) either a
    DTensor on that mesh or this rank's sequence shard (what the sequence-parallel final norm returns);
    labels (B, S_full) of the whole (context-parallel) shard. Every tp rank returns the same value. softcap:
    the logits soft-capped first (softcap * tanh(logits / softcap))."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    mesh = weight.device_mesh
    if mesh.ndim != 1 or mesh.mesh_dim_names != ("tp",) or weight.placements != (Shard(0),):
        raise ValueError(f"the output weight must be a tensor-parallel shard (rows over the 'tp' mesh), got "
                         f"{weight.placements} over {mesh.mesh_dim_names}: an FSDP shard read outside its module's "
                         "forward? (keep that FSDP unit unsharded after forward)")
    comm = Comm.get(mesh)
    rows = weight.to_local().shape[0]
    if not isinstance(hidden, DTensor):
        hidden = DTensor.from_local(hidden, mesh, [Shard(1)], run_check=False)
    # one all-gather of the hidden states (not of logits); the gradient comes back as a partial sum
    h = hidden.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
    want = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _VocabParallelCE.apply(h.flatten(0, 1), weight.to_local(), labels.flatten(), comm.rank * rows, comm,
                                  chunk, ignore_index, want, softcap)

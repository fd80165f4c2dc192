"""Tensor parallelism for Hugging Face causal LMs (Llama, Qwen2/3, Mistral, Gemma, Cohere): Megatron's split by
the module names these architectures share, with sequence parallelism between the blocks, as our Llama
has it (parallel/tensor.py). The embedding and output head are split by vocabulary rows (one parameter
again when tied), every norm is replicated over tp with its input a shard (of the sequence, or of the
heads for Qwen3's per-head q/k norms), and any parameter left unplaced is an error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ConfigError


def hf_tp_misfit(cfg, tp: int, tp_as: str = "parallel.tp={}"):
    """The first thing tensor parallelism needs of an HF model's sizes (`cfg`: its longctx ModelConfig) that
    they lack, as a TpMisfit, or None."""
    from ..parallel.tensor import TpMisfit, tp_misfit

    misfit = tp_misfit(cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, tp, cfg.ffn_dim, tp_as=tp_as)
    if misfit is None and cfg.n_kv_heads % tp:
        misfit = TpMisfit(f"the model's {cfg.n_kv_heads} K/V heads (model.hf_path) do not split evenly over "
                          f"{tp_as.format(tp)}", "sharing one K/V head across tp ranks is longctx's own Llama's, not a "
                          "Hugging Face model's", f"use a tp that divides {cfg.n_kv_heads}")
    return misfit


def check_hf_tp(cfg, tp: int) -> None:
    """What tensor parallelism needs of an HF model's sizes (`cfg`: its longctx ModelConfig)."""
    misfit = hf_tp_misfit(cfg, tp)
    if misfit:
        raise ValueError(str(misfit))


# Megatron's split of a Llama-style decoder layer, by the module names Llama, Qwen2/3, Mistral and Gemma share
_LAYER_PLAN = {"self_attn.q_proj": "colwise", "self_attn.k_proj": "colwise", "self_attn.v_proj": "colwise",
               "self_attn.o_proj": "rowwise", "mlp.gate_proj": "colwise", "mlp.up_proj": "colwise",
               "mlp.down_proj": "rowwise"}
_REPLICATED = ("input_layernorm",)  # norms of the residual stream's sequence shards
# a second norm of the residual stream, absent where attention and MLP share the first (Cohere's parallel block:
# h + attn(ln(h)) + mlp(ln(h)), each branch gathering ln(h) and reduce-scattering its output); Gemma2/3's norms
# around the MLP: of its input (the residual stream) and of its output (down_proj's reduce-scattered sequence
# shards), so on sequence shards too
_REPLICATED_IF_PRESENT = ("post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
_PER_HEAD = ("self_attn.q_norm", "self_attn.k_norm")  # Qwen3: one (head_dim,) weight shared by every head


def apply_hf_tensor_parallel(model: nn.Module, tp_mesh, *, sequence_parallel: bool = True) -> None:
    """Tensor parallelism for a transformers causal LM, with sequence parallelism as Megatron and our Llama
    (parallel/tensor.py) do: between the blocks every tp rank holds 1/tp of the sequence (the residual
    stream, the norms and their saved activations); the attention and MLP inputs are all-gathered, q/k/v
    and the MLP's gate/up split by columns (heads, hidden units), o/down by rows with their outputs
    reduce-scattered back to the sequence shards; the embedding and the output projection split by
    vocabulary rows (the loss is vocabulary-parallel, gathering the final hidden states once). The norms
    become Replicate DTensors that take their input as a Shard of the sequence, so every parameter lives on
    the tp mesh (what FSDP2, the optimizer's multi-tensor step and the global-norm clipping expect) and
    their gradients, partial sums over the shards, are all-reduced by DTensor.
    Per-head q/k norms (Qwen3: a (head_dim,) weight applied to every head) are Replicate DTensors that
    take this rank's heads as a Shard of the heads dimension, so their gradient (this rank's heads'
    share) is a Partial sum that DTensor all-reduces over tp. A parameter this plan does not place is
    refused by name: silently replicating it could leave its gradient unsummed over tp (OLMo2's q/k
    norms span all heads' features, a reduction over the split dimension: refused).

    sequence_parallel=False is the inference split (generation, evaluation): a decode step's one token per
    row cannot be split over the sequence, so the residual stream stays whole on every tp rank, o/down and
    the embedding all-reduce instead of reduce-scattering, the norms keep plain (whole) weights, and the
    logits stay split by vocabulary (a DTensor: generation gathers one token's, perplexity never does)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        parallelize_module,
    )

    between = Shard(1) if sequence_parallel else Replicate()  # the residual stream between the blocks
    styles = {"colwise": ColwiseParallel, "rowwise": lambda: RowwiseParallel(output_layouts=between)}
    gather = {  # the decoder layers call self_attn(hidden_states=...) and mlp(hidden_states)
        "self_attn": PrepareModuleInput(input_kwarg_layouts={"hidden_states": Shard(1)},
                                        desired_input_kwarg_layouts={"hidden_states": Replicate()}),
        "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    } if sequence_parallel else {}
    replicate = _replicate if sequence_parallel else (lambda module, mesh, shard_dim: None)  # whole, plain
    placed = set()
    for i, layer in enumerate(model.model.layers):
        if next(layer.parameters(), None) is None:  # a pipeline stage's stand-in for another stage's layer
            continue
        names = dict(layer.named_modules())
        missing = [n for n in (*_LAYER_PLAN, *_REPLICATED) if n not in names]
        if missing:
            raise ConfigError(f"parallel.tp>1 with {type(model).__name__}: its decoder layers have no "
                              f"{', '.join(missing)} (the Llama/Qwen/Mistral/Gemma layout); use parallel.tp=1 (--tp 1 "
                              "for eval and generate)")
        parallelize_module(layer, tp_mesh, {**gather, **{n: styles[s]() for n, s in _LAYER_PLAN.items()}})
        whole = [*_REPLICATED, *(n for n in _REPLICATED_IF_PRESENT if n in names)]
        for n in whole:
            replicate(names[n], tp_mesh, shard_dim=1)
        per_head = [n for n in _PER_HEAD if n in names and _is_per_head(names[n], names["self_attn"])]
        for n in per_head:
            replicate(names[n], tp_mesh, shard_dim=-2)
        placed.update(f"model.layers.{i}.{n}.{p}" for n in (*_LAYER_PLAN, *whole, *per_head)
                      for p, _ in names[n].named_parameters())
    embed, lm_head = model.model.embed_tokens, model.lm_head  # None on pipeline stages without them
    tied = embed is not None and lm_head is not None and lm_head.weight is embed.weight
    head = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()) if sequence_parallel else \
        ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    ends = {"model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=between),
            "lm_head": head}
    present = {"model.embed_tokens": embed is not None, "lm_head": lm_head is not None}
    parallelize_module(model, tp_mesh, {k: v for k, v in ends.items() if present[k]})
    if tied:  # both split by vocabulary rows: one parameter again
        model.lm_head.weight = model.model.embed_tokens.weight
    if lm_head is not None and hasattr(model.model, "norm"):  # a stage before the last: an identity, no head
        replicate(model.model.norm, tp_mesh, shard_dim=1)  # (a final norm named otherwise is left unplaced)
    placed.update(("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"))
    left = [n for n, _ in model.named_parameters() if n not in placed]
    if left:
        raise ConfigError(f"parallel.tp>1 with {type(model).__name__}: no tensor-parallel placement for "
                          f"{', '.join(left[:4])}{' ...' if len(left) > 4 else ''}; use parallel.tp=1 (--tp 1 for eval "
                          "and generate)")


def _is_per_head(norm: nn.Module, attention: nn.Module) -> bool:
    """A norm over one head's features (its only parameter has head_dim entries)."""
    params = list(norm.parameters())
    head_dim = getattr(attention, "head_dim", None)
    return head_dim is not None and len(params) == 1 and tuple(params[0].shape) == (head_dim,)


def _replicate(module: nn.Module, tp_mesh, shard_dim: int) -> None:
    """A module with the same parameters on every tp rank (a norm): they become Replicate DTensors, its
    input enters as a Shard of `shard_dim` (1: the sequence, -2: the heads of (.., heads, head_dim)), its
    output leaves as this rank's plain tensor."""
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor

    def params(name, mod, mesh):
        for key, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(key, nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()],
                                                                       src_data_rank=None), p.requires_grad))

    def inputs(mod, args, mesh):
        return tuple(DTensor.from_local(a, mesh, [Shard(shard_dim % a.dim())], run_check=False)
                     if isinstance(a, torch.Tensor) and not isinstance(a, DTensor) else a for a in args)

    def output(mod, out, mesh):
        return out.to_local() if isinstance(out, DTensor) else out

    distribute_module(module, tp_mesh, params, input_fn=inputs, output_fn=output)

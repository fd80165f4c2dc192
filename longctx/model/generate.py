"""Generation over context-parallel ranks: prefill the prompt with any sequence-parallel strategy into a
ShardedKVCache, then decode with tree attention (or ring decoding, the comparison) across the same ranks.

The model is a plain model with its weights on every rank (longctx's Transformer, or a Hugging Face causal
LM through HFCausalLM: model/hf_generate.py), or a longctx Transformer split over a tp mesh by
apply_tensor_parallel, with `group` its context-parallel ranks (one per tp group). The driver here is
shared; each model kind supplies a prefill and a decode step (`_LlamaSteps`, `HFSteps`).
Prefill runs one forward over this rank's shard of the prompt with the strategy's context-parallel
attention, capturing K/V (after RoPE); the shards are gathered once and every rank keeps its round-robin
share of the cache. Each decode step runs the new tokens (replicated, one per row) through the layers:
projections and RoPE locally, attention over the sharded cache (two small all-reduces for tree: bytes
independent of the context length), the MLP locally. Under tensor parallelism the prefill is the model's
own sequence-parallel forward (each rank caches its heads), and a decode step uses this rank's pieces of
the weights: its heads and hidden units, one all-reduce of (B, 1, dim) after each of wo and w2, one after
the vocabulary-split embedding and one all-gather of the logits (longctx.parallel.tensor).

Prompts of unequal length are left-padded: the padding is its own document during prefill (attention and
RoPE of the real tokens never see it) and hidden from decoding by a per-row first valid position. A
sliding window is the same rule: the new token at position p sees cached keys from max(pad, p - window + 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from ..parallel.comm import Comm
from ..parallel.sequence.api import ContextParallelAttention
from ..parallel.sequence.documents import Documents
from ..parallel.sequence.layouts import divisor, positions, unshard
from ..parallel.sequence.registry import get_strategy
from ..parallel.sequence.schedule import pack_kv, unpack_kv
from ..parallel.sequence.tree import ShardedKVCache, local_partial
from ..parallel.tensor import local_linear, local_tensor, tp_comm, vocab_parallel_embedding, vocab_parallel_logits
from .llama import LocalAttention, rms_norm
from .rope import rope


@dataclass
class Generation:
    tokens: list[torch.Tensor]  # per row: the new tokens (eos included when it stopped there)
    logits: list[torch.Tensor] | None  # per step: (B, vocab) fp32 logits the step's tokens were chosen from
    prompt_len: int  # padded prompt length (a multiple of what the strategy needs, plus the last token)


class _Capture(nn.Module):
    """Wraps a core for the prefill: keeps the K/V it is given (this rank's shard, after RoPE)."""

    def __init__(self, core):
        super().__init__()
        self.core, self.kv = core, None

    def forward(self, q, k, v, position_ids=None, documents=None):
        self.kv = (k, v)
        return self.core(q, k, v, position_ids=position_ids, documents=documents)


def _pick(logits, temperature: float, top_k: int | None, gen: torch.Generator):
    if temperature <= 0:
        return logits.argmax(-1)
    # the best score 0 before dividing: a tiny temperature then sends the others to -inf, not all to +-inf
    # (in float64: a temperature below float32's range would turn the divisor into 0, the best score into 0/0)
    scores = (logits - logits.max(-1, keepdim=True).values).double() / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(-1)


def _check(prompts, max_new_tokens, decode, temperature, top_k, strategy, vocab_size: int, pad_id: int):
    if not isinstance(prompts, (list, tuple)):  # a (B, S) tensor would be read as rows of unequal length
        raise ValueError(f"prompts must be a list of 1-D token tensors (one per row, lengths may differ), not a "
                         f"{type(prompts).__name__}; for a (B, S) tensor pass list(tensor)")
    if not prompts or any(not isinstance(p, torch.Tensor) or p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-D token tensors (one per row)")
    not_ids = next((p.dtype for p in prompts if p.dtype.is_floating_point or p.dtype.is_complex
                    or p.dtype == torch.bool), None)
    if not_ids is not None:
        raise ValueError(f"prompts must hold integer token ids (torch.long), not {not_ids}")
    for i, p in enumerate(prompts):
        if int(p.min()) < 0 or int(p.max()) >= vocab_size:
            raise ValueError(f"prompt {i} has token id {int(p.max()) if int(p.max()) >= vocab_size else int(p.min())}, "
                             f"outside the model's vocabulary 0..{vocab_size - 1}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the model's vocabulary 0..{vocab_size - 1}")
    if not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if decode not in ("tree", "ring"):
        raise ValueError(f"decode={decode!r}: choose 'tree' or 'ring' (the comparison)")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError("temperature must be >= 0 (0: greedy) and top_k None or >= 1")
    if top_k is not None and temperature == 0:
        raise ValueError(f"top_k={top_k} samples among the k likeliest tokens, but temperature 0 is greedy (always "
                         "the likeliest): give a temperature > 0, or leave top_k out")
    if get_strategy(strategy).name == "hybrid":
        raise ValueError("generate() takes a process group, and strategy='hybrid' needs a (ring, ulysses) mesh; use "
                         "ulysses, allgather or a ring-family strategy for the prefill")


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens: int, group=None, strategy: str = "zigzag", decode: str = "tree",
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | Iterable[int] | None = None,
             pad_id: int = 0,
             seed: int = 0, kernel: str = "auto", return_logits: bool = False) -> Generation:
    """Continue every prompt (1-D token tensors, any lengths) by up to max_new_tokens tokens, greedy
    (temperature 0) or sampled (temperature, top_k; the same seeded draws on every rank), stopping a row at
    eos_id (one id, or several: an HF model's generation_config may list them). `group`: the context-parallel
    ranks (None: the world if initialised, else this process); with a tensor-parallel model, the cp group of a
    (cp, tp) mesh, e.g. ParallelMesh.cp. An HF model's attention implementation is restored afterwards."""
    _check(prompts, max_new_tokens, decode, temperature, top_k, strategy, _vocab_size(model), pad_id)
    eos_ids = set() if eos_id is None else {int(eos_id)} if isinstance(eos_id, int) else {int(e) for e in eos_id}
    steps = _steps_for(model)
    try:
        return _generate(steps, prompts, max_new_tokens, group, strategy, decode, temperature, top_k, eos_ids,
                         pad_id, seed, kernel, return_logits)
    finally:
        steps.close()


def _vocab_size(model) -> int:
    cfg = getattr(model, "cfg", None)
    if cfg is None:
        raise TypeError("generate() takes a longctx Transformer (build_model; whole, or split by "
                        "apply_tensor_parallel) or an HFCausalLM with its weights on every rank")
    return cfg.vocab_size


def _generate(steps, prompts, max_new_tokens, group, strategy, decode, temperature, top_k, eos_ids, pad_id, seed,
              kernel, return_logits) -> Generation:
    import torch.distributed as dist

    comm = Comm.get(group) if dist.is_initialized() else None
    tp = steps.tp  # the Comm of the tp ranks the model is split over, or None
    if tp is not None:
        _check_orthogonal(comm, tp)
    world = comm.world if comm is not None else 1
    device = steps.device
    layout = get_strategy(strategy).layout()
    lens = [int(p.numel()) for p in prompts]
    b = len(prompts)
    # with sequence parallelism each cp shard of the prefill is split once more over the tp ranks
    need = (divisor(layout, world) if world > 1 else 1) * (tp.world if steps.prefill_splits_tp else 1)
    n_pre = -(-(max(lens) - 1) // need) * need  # prefill all but each row's last token, padded to split evenly
    total = n_pre + 1
    tokens = torch.full((b, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, total - lens[i]:] = p.cpu()
    pad = torch.tensor([total - n for n in lens])  # first real position of each row
    caches = [ShardedKVCache(group) if comm is not None else ShardedKVCache(rank=0, world=1)
              for _ in range(steps.n_caches)]
    if n_pre:
        steps.prefill(tokens[:, :n_pre].to(device), pad, caches, comm, strategy, layout, kernel)
    gen = torch.Generator().manual_seed(seed)
    x = tokens[:, -1].to(device)
    done = torch.zeros(b, dtype=torch.bool)
    out_tokens, out_logits = [[] for _ in range(b)], []
    for step in range(max_new_tokens):
        logits = steps.decode(x, n_pre + step, pad.to(device), caches, decode, kernel, comm).float()
        nxt = _pick(logits.cpu(), temperature, top_k, gen)
        for ranks in (comm, tp):  # one choice for all ranks, whatever rounding did to the logits
            if ranks is not None and ranks.world > 1:
                nxt = ranks.broadcast(nxt.to(ranks.device), src=0, phase="sample").cpu()
        if return_logits:
            out_logits.append(logits.cpu())
        for i in range(b):
            if not done[i]:
                out_tokens[i].append(int(nxt[i]))
                done[i] = int(nxt[i]) in eos_ids
        if bool(done.all()):
            break
        x = nxt.to(device)
    return Generation([torch.tensor(t, dtype=torch.long) for t in out_tokens], out_logits if return_logits else None,
                      total)


def _check_orthogonal(comm, tp) -> None:
    """The cp group must hold one rank of each tp group (this one): the ranks that share this rank's heads."""
    import torch.distributed as dist

    cp_ranks = set(dist.get_process_group_ranks(comm.group or dist.group.WORLD))
    tp_ranks = set(dist.get_process_group_ranks(tp.group or dist.group.WORLD))
    if cp_ranks & tp_ranks != {dist.get_rank()}:
        raise ValueError(f"generate(group=...) got ranks {sorted(cp_ranks)}, which overlap the model's tensor-parallel "
                         f"ranks {sorted(tp_ranks)}: pass the context-parallel group of the (cp, tp) mesh the model "
                         "was split on (ParallelMesh.cp, or mesh['cp'] of init_device_mesh)")


def _steps_for(model):
    if hasattr(model, "hf"):  # HFCausalLM
        from .hf_generate import HFSteps

        return HFSteps(model)
    if not hasattr(model, "layers") or not hasattr(model, "tok_embeddings"):
        raise TypeError("generate() takes a longctx Transformer (build_model; whole, or split by "
                        "apply_tensor_parallel) or an HFCausalLM with its weights on every rank")
    return _LlamaSteps(model)


def padding_documents(n: int, pad) -> Documents:
    """The left padding of each row as its own document (never seen by the real tokens)."""
    return Documents(n, tuple((0, int(p)) if 0 < p < n else (0,) for p in pad.tolist()))


def prefill_positions(layout: str, n: int, comm) -> torch.Tensor:
    """Global positions of this rank's shard of an n-token prefill (all of them without a process group)."""
    return positions(layout, n, comm.world, comm.rank) if comm is not None and comm.world > 1 else torch.arange(n)


def first_visible(pad, position: int, window: int | None, chunk: int | None = None):
    """Per row, the first cached position the token at `position` sees: after the padding, inside the window,
    or (chunked attention) from the start of its chunk, counted from the row's first real token."""
    if chunk is not None:
        return pad + (position - pad) // chunk * chunk
    return pad if window is None else torch.clamp(pad, min=position - window + 1)


def decode_attention(q, cache: ShardedKVCache, *, key_start, scale: float, decode: str, kernel: str, comm,
                     sinks=None, softcap=None):
    """One new query per row against the sharded cache (tree or ring across ranks, or this process alone);
    `sinks` (H,): attention sinks, merged into the combined softmax."""
    if comm is None:  # one process, no process group: nothing to combine
        out, lse = local_partial(q, cache.k, cache.v, scale=scale, kernel=kernel, key_start=key_start,
                                 k_positions=cache.global_positions(), softcap=softcap)
    else:
        out, lse = cache.decode(q, strategy=decode, key_start=key_start, kernel=kernel, scale=scale, return_lse=True,
                                softcap=softcap)
    if sinks is not None:
        out, _ = kernels.merge_sinks(out, lse, sinks)
    return out.to(q.dtype)


class _LlamaSteps:
    """Prefill and decode step of longctx's Transformer."""

    def __init__(self, model):
        if model.cfg.dilated.layers:
            raise ValueError("generate() supports causal and sliding-window attention layers (dilated layers: the "
                             "decode step would need their sparsity pattern)")
        self.model, self.window = model, model.cfg.window
        self.tp = tp_comm(model.layers[0].attention.wq.weight)
        self.prefill_splits_tp = self.tp is not None  # apply_tensor_parallel's split is sequence-parallel
        self.device = local_tensor(model.tok_embeddings.weight).device
        self.n_caches = len(model.layers)

    def close(self) -> None:
        """Nothing of the model was changed."""

    def prefill(self, tokens, pad, caches, comm, strategy, layout, kernel):
        model, n = self.model, tokens.shape[1]
        world = comm.world if comm is not None else 1
        pos = prefill_positions(layout, n, comm)
        cores = [layer.attention.core for layer in model.layers]
        try:
            for layer in model.layers:
                inner = ContextParallelAttention(strategy, comm.group, causal=True, kernel=kernel, layout=layout,
                                                 window=self.window, check_positions=False) if world > 1 \
                    else LocalAttention(kernel=kernel, window=self.window)
                layer.attention.core = _Capture(inner)
            model(tokens[:, pos.to(tokens.device)], pos.to(tokens.device), documents=padding_documents(n, pad),
                  return_hidden=True)  # no logits: decoding starts from the prompt's last token
            for layer, cache in zip(model.layers, caches):
                cache_prefill(cache, *layer.attention.core.kv, layout, comm)
        finally:
            for layer, core in zip(model.layers, cores):
                layer.attention.core = core

    def decode(self, x, position: int, pad, caches, decode, kernel, comm):
        """Logits (B, vocab) of one new token per row at global `position` (RoPE: position - pad)."""
        model, tp = self.model, self.tp
        b = x.shape[0]

        def norm(module, t):
            return rms_norm(t, local_tensor(module.weight), module.eps)

        def rowwise(linear, t):  # a partial sum per tp rank until reduced
            out = local_linear(linear, t)
            return tp.all_reduce(out, phase="tp") if tp is not None else out

        h = model.tok_embeddings(x[:, None]) if tp is None else vocab_parallel_embedding(model.tok_embeddings,
                                                                                          x[:, None], tp)
        rope_pos = (position - pad)[:, None]
        key_start = first_visible(pad, position, self.window)
        for layer, cache in zip(model.layers, caches):
            att, ffn = layer.attention, layer.feed_forward
            hn = norm(layer.attention_norm, h)
            q = local_linear(att.wq, hn).view(b, 1, -1, att.head_dim)
            k = local_linear(att.wk, hn).view(b, 1, -1, att.head_dim)
            v = local_linear(att.wv, hn).view(b, 1, -1, att.head_dim)
            q, k = rope(q, rope_pos, att.theta, att.rope_scaling), rope(k, rope_pos, att.theta, att.rope_scaling)
            cache.append(k, v)
            o = decode_attention(q, cache, key_start=key_start, scale=att.head_dim ** -0.5, decode=decode,
                                 kernel=kernel, comm=comm)
            h = h + rowwise(att.wo, o.reshape(b, 1, -1))
            hn = norm(layer.ffn_norm, h)
            h = h + rowwise(ffn.w2, F.silu(local_linear(ffn.w1, hn)) * local_linear(ffn.w3, hn))
        hn = norm(model.norm, h)[:, 0]
        return local_linear(model.output, hn) if tp is None else vocab_parallel_logits(model.output, hn, tp)


def cache_prefill(cache: ShardedKVCache, k, v, layout: str, comm) -> None:
    """This rank's prefill K/V (layout shard, after RoPE) -> the whole prompt in natural order -> its share."""
    if comm is not None and comm.world > 1:
        kv = pack_kv(k, v)  # one gather for both (of two widths under latent attention)
        k, v = unpack_kv(unshard(kv, layout, group=comm.group, dim=kv.dim() - 3), k.shape[-1])
    cache.prefill(k, v)

"""Generation over context-parallel ranks: prefill the prompt with any sequence-parallel strategy into a
ShardedKVCache, then decode with tree attention (or ring decoding, the comparison) across the same ranks.

The model stays a plain single-device Transformer with its weights on every rank; only attention is
distributed. Prefill swaps each layer's core for the strategy's context-parallel core for one forward over
this rank's shard of the prompt, capturing K/V (after RoPE); the shards are gathered once and every rank
keeps its round-robin share of the cache. Each decode step runs the new tokens (replicated, one per row)
through the layers by hand: projections and RoPE locally, attention over the sharded cache (two small
all-reduces for tree: bytes independent of the context length), the MLP locally.

Prompts of unequal length are left-padded: the padding is its own document during prefill (attention and
RoPE of the real tokens never see it) and hidden from decoding by a per-row first valid position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..parallel.comm import Comm
from ..parallel.sequence.api import ContextParallelAttention
from ..parallel.sequence.documents import Documents
from ..parallel.sequence.layouts import divisor, positions, unshard
from ..parallel.sequence.registry import get_strategy
from ..parallel.sequence.tree import ShardedKVCache, local_partial
from .llama import LocalAttention, rope


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
    scores = logits / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=gen).squeeze(-1)


def _check(model, prompts, max_new_tokens, decode, temperature, top_k, strategy):
    if not hasattr(model, "layers") or not hasattr(model, "tok_embeddings"):
        raise TypeError("generate() takes a longctx Transformer (build_model), unparallelized, weights on every rank")
    if not prompts or any(p.dim() != 1 or p.numel() == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty 1-D token tensors (one per row)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if decode not in ("tree", "ring"):
        raise ValueError(f"decode={decode!r}: choose 'tree' or 'ring' (the comparison)")
    if temperature < 0 or (top_k is not None and top_k < 1):
        raise ValueError("temperature must be >= 0 (0: greedy) and top_k None or >= 1")
    if model.cfg.window is not None or model.cfg.dilated.layers:
        raise ValueError("generate() supports full causal attention layers only (model.window / dilated layers: "
                         "the decode step would need their masks)")
    if get_strategy(strategy).name == "hybrid":
        raise ValueError("generate() takes a process group, and strategy='hybrid' needs a (ring, ulysses) mesh; use "
                         "ulysses, allgather or a ring-family strategy for the prefill")


@torch.no_grad()
def generate(model, prompts, *, max_new_tokens: int, group=None, strategy: str = "zigzag", decode: str = "tree",
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None, pad_id: int = 0,
             seed: int = 0, kernel: str = "auto", return_logits: bool = False) -> Generation:
    """Continue every prompt (1-D token tensors, any lengths) by up to max_new_tokens tokens, greedy
    (temperature 0) or sampled (temperature, top_k; the same seeded draws on every rank), stopping a row at
    eos_id. `group`: the context-parallel ranks (None: the world if initialised, else this process)."""
    _check(model, prompts, max_new_tokens, decode, temperature, top_k, strategy)
    import torch.distributed as dist

    comm = Comm.get(group) if dist.is_initialized() else None
    world = comm.world if comm is not None else 1
    device = model.tok_embeddings.weight.device
    layout = get_strategy(strategy).layout()
    lens = [int(p.numel()) for p in prompts]
    b = len(prompts)
    need = divisor(layout, world) if world > 1 else 1
    n_pre = -(-(max(lens) - 1) // need) * need  # prefill all but each row's last token, padded to split evenly
    total = n_pre + 1
    tokens = torch.full((b, total), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        tokens[i, total - lens[i]:] = p.cpu()
    pad = torch.tensor([total - n for n in lens])  # first real position of each row
    caches = [ShardedKVCache(group) if comm is not None else ShardedKVCache(rank=0, world=1) for _ in model.layers]
    if n_pre:
        _prefill(model, tokens[:, :n_pre].to(device), pad, caches, comm, strategy, layout, kernel)
    gen = torch.Generator().manual_seed(seed)
    x = tokens[:, -1].to(device)
    done = torch.zeros(b, dtype=torch.bool)
    out_tokens, out_logits = [[] for _ in range(b)], []
    for step in range(max_new_tokens):
        logits = _decode_step(model, x, n_pre + step, pad.to(device), caches, decode, kernel, comm).float()
        nxt = _pick(logits.cpu(), temperature, top_k, gen)
        if comm is not None and world > 1:  # one choice for all ranks, whatever rounding did to the logits
            nxt = comm.broadcast(nxt.to(comm.device), src=0, phase="sample").cpu()
        if return_logits:
            out_logits.append(logits.cpu())
        for i in range(b):
            if not done[i]:
                out_tokens[i].append(int(nxt[i]))
                done[i] = eos_id is not None and int(nxt[i]) == eos_id
        if bool(done.all()):
            break
        x = nxt.to(device)
    return Generation([torch.tensor(t, dtype=torch.long) for t in out_tokens], out_logits if return_logits else None,
                      total)


def _prefill(model, tokens, pad, caches, comm, strategy, layout, kernel):
    n = tokens.shape[1]
    world = comm.world if comm is not None else 1
    docs = Documents(n, tuple((0, int(p)) if 0 < p < n else (0,) for p in pad.tolist()))
    pos = positions(layout, n, world, comm.rank) if world > 1 else torch.arange(n)
    cores = [layer.attention.core for layer in model.layers]
    try:
        for layer in model.layers:
            inner = ContextParallelAttention(strategy, comm.group, causal=True, kernel=kernel, layout=layout,
                                             check_positions=False) if world > 1 else LocalAttention(kernel=kernel)
            layer.attention.core = _Capture(inner)
        model(tokens[:, pos.to(tokens.device)], pos.to(tokens.device), documents=docs)
        for layer, cache in zip(model.layers, caches):
            k, v = layer.attention.core.kv
            if world > 1:  # layout shards -> the whole prompt in natural order -> each rank keeps its share
                k, v = unshard(torch.stack([k, v]), layout, group=comm.group, dim=2)
            cache.prefill(k, v)
    finally:
        for layer, core in zip(model.layers, cores):
            layer.attention.core = core


def _decode_step(model, x, position: int, pad, caches, decode, kernel, comm):
    """Logits (B, vocab) of one new token per row at global `position` (RoPE: position - pad)."""
    h = model.tok_embeddings(x[:, None])
    rope_pos = (position - pad)[:, None]
    for layer, cache in zip(model.layers, caches):
        att = layer.attention
        hn = layer.attention_norm(h)
        q = att.wq(hn).view(h.shape[0], 1, -1, att.head_dim)
        k = att.wk(hn).view(h.shape[0], 1, -1, att.head_dim)
        v = att.wv(hn).view(h.shape[0], 1, -1, att.head_dim)
        q, k = rope(q, rope_pos, att.theta), rope(k, rope_pos, att.theta)
        cache.append(k, v)
        if comm is None:  # one process, no process group: nothing to combine
            o = local_partial(q, cache.k, cache.v, scale=att.head_dim ** -0.5, kernel=kernel, key_start=pad,
                              k_positions=cache.global_positions())[0].to(q.dtype)
        else:
            o = cache.decode(q, strategy=decode, key_start=pad, kernel=kernel)
        h = h + att.wo(o.reshape(h.shape[0], 1, -1))
        h = h + layer.feed_forward(layer.ffn_norm(h))
    return model.output(model.norm(h))[:, 0]


"""Generation for Hugging Face causal LMs (HFCausalLM): the prefill and decode step of model/generate.py's
driver, through the model's own layers.

Nothing of the HF model is reimplemented: its attention modules already call longctx through the
AttentionInterface (`_longctx_cores`), so generation only swaps what those calls do. During the prefill
each module's cores run the strategy's context-parallel attention and keep the K/V they were handed
(this rank's shard, after the model's own RoPE, norms and scaling); during a decode step they append the
new token's K/V to that module's ShardedKVCache and attend over the cache with tree (or ring) decoding,
with the softmax scale and sliding window the module passes (Gemma's query_pre_attn_scalar, Mistral and
Qwen2/Gemma3 sliding layers). The cores the model had before are put back afterwards.
"""

from __future__ import annotations

from .generate import cache_prefill, decode_attention, first_visible, padding_documents, prefill_positions
from .hf import AttentionCores, use_longctx_attention
from .hf_checks import attention_modules, check_generation_rope, check_hf_rope


class _Capture:
    """Prefill: this rank's strategy, and the K/V it was given kept for the cache."""

    def __init__(self, cores: AttentionCores):
        self.cores, self.kv = cores, None

    def __call__(self, q, k, v, *, scale, window, documents, sinks=None, chunk=None, softcap=None):
        self.kv = (k, v)
        return self.cores(q, k, v, scale=scale, window=window, documents=documents, sinks=sinks, chunk=chunk,
                          softcap=softcap)


class _Decode:
    """A decode step: the new token's K/V into the cache, its query against the cache."""

    def __init__(self, cache, position: int, pad, decode: str, kernel: str, comm):
        self.cache, self.position, self.pad, self.decode, self.kernel, self.comm = (
            cache, position, pad, decode, kernel, comm)

    def __call__(self, q, k, v, *, scale, window, documents, sinks=None, chunk=None, softcap=None):
        self.cache.append(k, v)
        return decode_attention(q, self.cache, key_start=first_visible(self.pad, self.position, window, chunk),
                                scale=scale, decode=self.decode, kernel=self.kernel, comm=self.comm, sinks=sinks,
                                softcap=softcap)


class HFSteps:
    """Prefill and decode step of an HFCausalLM: whole weights on every rank, or split over a tp mesh by
    apply_hf_tensor_parallel(..., sequence_parallel=False) (each rank's attention modules then see and cache
    its heads; the logits of a step are gathered from the vocabulary split)."""

    def __init__(self, adapter):
        from torch.distributed.tensor import DTensor

        from ..parallel.tensor import local_tensor, tp_comm

        check_generation_rope(adapter.hf.config)
        self.previous = adapter.hf.config._attn_implementation  # put back by close(): the caller's model
        use_longctx_attention(adapter.hf)
        self.adapter, self.modules = adapter, attention_modules(adapter.hf)
        weight = adapter.hf.lm_head.weight
        self.tp = tp_comm(weight)
        norm = getattr(adapter.hf.model, "norm", None)
        if self.tp is not None and norm is not None and isinstance(norm.weight, DTensor):  # the training split
            raise ValueError("generate() takes an HF model whose weights are whole or split for inference by "
                             "apply_hf_tensor_parallel(model, tp_mesh, sequence_parallel=False) (a decode step's "
                             "one token per row cannot be split over the sequence)")
        self.prefill_splits_tp = False  # the inference split: every tp rank sees the whole sequence
        self.device = local_tensor(weight).device
        self.n_caches = len(self.modules)

    def close(self) -> None:
        """The model's attention implementation as it was (a model the caller runs with sdpa afterwards)."""
        if self.previous is not None and self.previous != self.adapter.hf.config._attn_implementation:
            self.adapter.hf.set_attn_implementation(self.previous)

    def _with(self, handlers, fn):
        saved = [getattr(m, "_longctx_cores", None) for m in self.modules]
        try:
            for m, h in zip(self.modules, handlers):
                m._longctx_cores = h
            return fn()
        finally:
            for m, old in zip(self.modules, saved):
                m._longctx_cores = old

    def prefill(self, tokens, pad, caches, comm, strategy, layout, kernel):
        n = tokens.shape[1]
        world = comm.world if comm is not None else 1
        check_hf_rope(self.adapter.hf.config, world, "the group size")  # a prefill shard sees its own length
        pos = prefill_positions(layout, n, comm).to(tokens.device)
        captures = [_Capture(AttentionCores(strategy, comm.group if world > 1 else None, layout, kernel, world))
                    for _ in self.modules]
        docs = padding_documents(n, pad)
        rope = docs.rope_positions(pos).expand(tokens.shape[0], -1)
        self._with(captures, lambda: self.adapter.hidden(tokens[:, pos], rope, docs))
        for capture, cache in zip(captures, caches):
            cache_prefill(cache, *capture.kv, layout, comm)

    def decode(self, x, position: int, pad, caches, decode, kernel, comm):
        """Logits (B, vocab) of one new token per row at global `position` (RoPE: position - pad)."""
        handlers = [_Decode(cache, position, pad, decode, kernel, comm) for cache in caches]
        h = self._with(handlers, lambda: self.adapter.hidden(x[:, None], (position - pad)[:, None]))
        logits = self.adapter.logits(h)
        return (logits.full_tensor() if self.tp is not None else logits)[:, 0]

"""Closed-form bytes per mesh axis of one micro-batch's forward and backward, per rank: the model the
counted bytes (longctx.parallel.collectives.CollectiveCounter) are tested against, for tp and cp.

Tensor parallel (sequence parallel, fp32 activations): with c = seq_len / cp tokens per context rank and
X = (tp - 1) * B * (c / tp) * D * e, the bytes of one (B, c/tp, D) shard gathered or of one (B, c, D)
partial sum reduce-scattered:
  per block    fwd: all-gather before attention and MLP, reduce-scatter after wo and w2  = 4 X
               bwd: the mirror (reduce-scatter of the input grads, all-gather of the output grads) = 4 X
               a recomputed block (activation checkpointing) runs its forward again, but only up to the last
               tensor the backward needs (non-reentrant checkpointing stops early), so the final
               reduce-scatter after w2 is not repeated: + 3 X
  embedding    fwd reduce-scatter X, bwd all-gather X (the vocab-sharded weight needs every token's grad)
  loss         the final hidden states gathered once (X); per loss chunk of r tokens an all-reduce MAX of r
               floats and an all-reduce SUM of 2r; the hidden-state gradient (a partial sum per rank)
               reduce-scattered back to the sequence shards once (X in fp32)
  norms        under FSDP2 the 2 L + 1 RMSNorm weight gradients (Partial sums over tp) are all-reduced in the
               backward, before FSDP's reduce-scatter (without FSDP they stay Partial until the optimizer);
               so are wk and wv when tp > n_kv_heads (replicated K/V heads: 2 L more)
Context parallel: the strategy's attention bytes (comm_model) per layer with this rank's n_heads/tp query
and max(1, n_kv_heads/tp) K/V heads, forward again for each recomputed layer.
"""

from __future__ import annotations

from ..config import head_dim_of
from ..parallel.sequence.registry import comm_model


def _allreduce(nbytes: int, w: int) -> int:
    return 2 * nbytes * (w - 1) // w


def tp_bytes(*, tp: int, batch: int, tokens: int, dim: int, n_layers: int, vocab_chunk: int, act_bytes: int = 4,
             acc_bytes: int = 4, recomputed_layers: int = 0, fsdp: bool = False, shared_kv_dim: int = 0) -> int:
    """Tensor-parallel bytes of one forward + backward; `tokens` per context rank (seq_len / cp).
    `shared_kv_dim`: n_kv_heads x head_dim when tp > n_kv_heads (wk and wv replicated over tp, their
    gradients Partial sums: all-reduced under FSDP2 like the norms')."""
    if tp == 1:
        return 0
    x = (tp - 1) * batch * (tokens // tp) * dim * act_bytes
    total = 8 * x * n_layers + 3 * x * recomputed_layers + 2 * x  # blocks, recompute, embedding
    total += (tp - 1) * batch * (tokens // tp) * dim * acc_bytes  # loss: hidden states gathered
    rows = batch * tokens
    step = vocab_chunk if vocab_chunk > 0 else rows
    for start in range(0, rows, step):
        r = min(step, rows - start)
        total += _allreduce(r * acc_bytes, tp) + _allreduce(2 * r * acc_bytes, tp)
    total += (tp - 1) * rows * dim * acc_bytes // tp  # the partial hidden-state gradient, reduce-scattered
    if fsdp:
        total += (2 * n_layers + 1) * _allreduce(dim * acc_bytes, tp)
        total += 2 * n_layers * _allreduce(shared_kv_dim * dim * acc_bytes, tp)
    return total


def cp_bytes(*, cp: int, strategy: str, layout: str | None, ulysses: int, batch: int, seq_len: int, heads: int,
             kv_heads: int, head_dim: int, n_layers: int, act_bytes: int = 4, recomputed_layers: int = 0) -> int:
    """Context-parallel attention bytes of one forward + backward (all layers)."""
    if cp == 1:
        return 0
    m = comm_model(strategy, world=cp, batch=batch, seq_len=seq_len, heads=heads, kv_heads=kv_heads,
                   head_dim=head_dim, dtype_bytes=act_bytes, layout=layout,
                   ulysses=ulysses if strategy == "hybrid" else None)
    return (m["fwd_bytes"] + m["bwd_bytes"]) * n_layers + m["fwd_bytes"] * recomputed_layers


def step_axis_bytes(cfg, dims, engine: str) -> dict:
    """{"tp": bytes, "cp": bytes} per rank for one micro-batch (fp32, pp = 1, dense attention layers)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    batch = t.batch_size // (dims.dp * t.accumulation)
    recomputed = {"none": 0, "full": m.n_layers}.get(p.activation_checkpoint,
                                                     len(range(0, m.n_layers, p.ac_every)))
    return {
        "tp": tp_bytes(tp=dims.tp, batch=batch, tokens=t.seq_len // dims.cp, dim=m.dim, n_layers=m.n_layers,
                       vocab_chunk=t.loss_chunk, recomputed_layers=recomputed, fsdp=engine in ("fsdp", "hsdp"),
                       shared_kv_dim=m.n_kv_heads * head_dim_of(m) if dims.tp > m.n_kv_heads else 0),
        "cp": cp_bytes(cp=dims.cp, strategy=dims.strategy, layout=dims.layout, ulysses=dims.ulysses, batch=batch,
                       seq_len=t.seq_len, heads=m.n_heads // dims.tp, kv_heads=max(1, m.n_kv_heads // dims.tp),
                       head_dim=head_dim_of(m), n_layers=m.n_layers, recomputed_layers=recomputed),
    }

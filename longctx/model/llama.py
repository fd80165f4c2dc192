"""Llama-style decoder: RMSNorm, RoPE on true positions, SwiGLU, GQA. No distributed code.

Each layer's `attention.core` is a module called as core(q, k, v, position_ids=...) on (batch, seq, heads,
head_dim) tensors; longctx.model.parallelize swaps it for a sequence-parallel one. Position ids come from
the data layout, so a sharded sequence gets the RoPE phases of its true positions. With `labels`, the
forward hands the final hidden states and the output weight to a loss function (the trainer's chunked
cross-entropy), so the (tokens x vocab) logits never have to exist at once, and the output weight is used
inside the forward, where data-parallel wrappers expect parameters to be used.
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import kernels
from ..config import ModelConfig, head_dim_of, validate_model
from ..parallel.sequence.schedule import local_attention
from .rope import rope, rope_scaling_of


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


DENSE_DOCUMENTS_LIMIT = 1 << 22  # batch x seq^2 up to which one document-masked call serves a packed batch


class LocalAttention(nn.Module):
    """Single-device causal (optionally sliding-window) attention through the kernel contract."""

    def __init__(self, causal: bool = True, window: int | None = None, kernel: str = "auto"):
        super().__init__()
        self.causal, self.window, self.kernel = causal, window, kernel

    def forward(self, q, k, v, position_ids=None, documents=None):
        mask = kernels.Mask.from_flags(self.causal, self.window)
        if documents is not None:
            b, s = q.shape[:2]
            if b * s * s > DENSE_DOCUMENTS_LIMIT:  # long: the planner's per-document blocks skip the rest
                return local_attention(q, k, v, causal=self.causal, window=self.window, kernel=self.kernel,
                                       documents=documents)
            # short: one call with a document mask beats many small per-document calls
            seg = documents.segment_ids().to(q.device)
            mask = mask.with_documents(seg.expand(b, -1) if seg.shape[0] == 1 else seg)
        return kernels.attention(q, k, v, mask=mask, backend=self.kernel)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, window={self.window}, kernel={self.kernel}"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, core: nn.Module):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.n_heads, cfg.n_kv_heads, head_dim_of(cfg)
        self.theta, self.rope_scaling = cfg.rope_theta, rope_scaling_of(cfg)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.core = core

    def forward(self, x, position_ids, documents=None, rope_ids=None):
        """rope_ids: RoPE positions when they differ from the layout's positions (packed documents restart
        at 0); documents: where packed documents start, handed to the core."""
        b, s, _ = x.shape
        # -1 heads: under tensor parallelism the projections hold this rank's share of the heads
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        angles = position_ids if rope_ids is None else rope_ids
        q, k = rope(q, angles, self.theta, self.rope_scaling), rope(k, angles, self.theta, self.rope_scaling)
        extra = {} if documents is None else {"documents": documents}
        o = self.core(q, k, v, position_ids=position_ids, **extra)
        return self.wo(o.reshape(b, s, -1))


class FeedForward(nn.Module):
    """SwiGLU. With chunks > 1 (and gradients on) the sequence is cut into chunks, each recomputed in the
    backward, so the (tokens x ffn_dim) intermediates of only one chunk exist at a time."""

    def __init__(self, dim: int, hidden: int, chunks: int = 1):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.chunks = chunks

    def _ffn(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def forward(self, x):
        if self.chunks <= 1 or not torch.is_grad_enabled() or x.shape[1] < self.chunks:
            return self._ffn(x)
        return torch.cat([checkpoint(self._ffn, part, use_reentrant=False)
                          for part in x.chunk(self.chunks, dim=1)], dim=1)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, core: nn.Module, mlp_chunks: int = 1):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg, core)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_dim, mlp_chunks)

    def forward(self, x, position_ids, documents=None, rope_ids=None):
        x = x + self.attention(self.attention_norm(x), position_ids, documents=documents, rope_ids=rope_ids)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, cores: list[nn.Module] | None = None, mlp_chunks: int = 1):
        super().__init__()
        validate_model(cfg)
        self.cfg = cfg
        cores = cores or [LocalAttention(window=cfg.window) for _ in range(cfg.n_layers)]
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, core, mlp_chunks) for core in cores)
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)

    def generate(self, prompts, **kwargs):
        """Continue prompts (list of 1-D token tensors): see longctx.model.generate.generate (context-parallel
        prefill, tree-attention decoding over the same ranks)."""
        from .generate import generate

        return generate(self, prompts, **kwargs)

    @torch.no_grad()
    def init_weights(self, seed: int, write=None, full_shape=None) -> None:
        """Initialise every parameter from its own generator, seeded by (seed, the parameter's name in the
        unsplit model), drawing the full-size value on CPU: the result depends neither on how the model was
        split (FSDP shards, tensor-parallel rows, pipeline stages keep their layers' names) nor on the
        device. Linear weights U(+-1/sqrt(fan_in)) and embeddings N(0, 1) as torch draws them, norms 1.
        `write(param, full)` stores the value (default: a copy); a sharded model passes one that keeps
        only this rank's piece (longctx.model.parallelize.Plan.materialize); `full_shape(param)` the unsplit
        shape when the parameter's own is not it (a DeepSpeed ZeRO-3 partition)."""
        write = write or _copy_into
        for module_name, module in self.named_modules():
            for param_name, param in module.named_parameters(recurse=False):
                name = f"{module_name}.{param_name}" if module_name else param_name
                shape = tuple(full_shape(param) if full_shape else param.shape)
                write(param, initial_value(module, param_name, shape, seed, name))

    def forward(self, tokens: torch.Tensor, position_ids: torch.Tensor | None = None, labels=None, loss_fn=None,
                return_hidden: bool = False, documents=None):
        """Logits (B, S, V); or, with labels and loss_fn, loss_fn(hidden (B, S, D), output weight, labels (B, S)).

        documents (longctx.parallel.Documents of the full sequences): packed documents; attention stays inside
        each, and RoPE positions restart at every document start.

        A pipeline stage is this module with parts removed: without tok_embeddings `tokens` are the previous
        stage's hidden states, without a head (norm/output) the hidden states are returned; so is the normed
        hidden state with return_hidden (the last stage, whose loss the pipeline schedule computes)."""
        if position_ids is None:
            position_ids = torch.arange(tokens.shape[1], device=tokens.device)
        rope_ids = None
        if documents is not None:
            if position_ids.dim() != 1:
                raise ValueError("with documents, position_ids must be this shard's positions (seq,), as "
                                 "plan.shard_batch gives them")
            rope_ids = documents.rope_positions(position_ids)
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values() if isinstance(self.layers, nn.ModuleDict) else self.layers:
            h = layer(h, position_ids, documents=documents, rope_ids=rope_ids)
        if self.norm is None:
            return h
        h = self.norm(h)
        if return_hidden:
            return h
        if labels is None:
            return self.output(h)
        if loss_fn is None:
            return F.cross_entropy(self.output(h).flatten(0, 1).float(), labels.flatten(), reduction="sum")
        return self.loss(h, labels, loss_fn)

    def loss(self, h, labels, loss_fn):
        """loss_fn(final hidden states, output weight, labels): the model's forward with labels, and the
        pipeline schedule's loss on the last stage."""
        return loss_fn(h, self.output.weight, labels)


def dilated_pattern(cfg: ModelConfig, seq_len: int | None) -> tuple[list[int], list[int]]:
    """The LongNet (segment_lengths, dilation_rates) of the dilated layers for a global sequence length."""
    from ..parallel.sequence.dilated import dilated_config

    d = cfg.dilated
    if d.segment_lengths:
        return list(d.segment_lengths), list(d.dilation_rates)
    if seq_len is None:
        raise ValueError("model.dilated.layers needs model.dilated.segment_lengths/dilation_rates, or "
                         "build_model(cfg, seq_len=N) so a geometric pattern can be derived from w0/alpha")
    return dilated_config(seq_len, w0=d.w0, alpha=d.alpha)


def initial_value(module: nn.Module, param_name: str, shape: tuple, seed: int, name: str) -> torch.Tensor:
    """The full float32 initial value of parameter `name` (of `module`), from a generator of its own."""
    digest = hashlib.sha256(f"{seed}/{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    value = torch.empty(shape)
    if isinstance(module, nn.Linear) and param_name == "weight":
        bound = 1 / math.sqrt(shape[1])
        return value.uniform_(-bound, bound, generator=generator)
    if isinstance(module, nn.Embedding):
        return value.normal_(generator=generator)
    if isinstance(module, RMSNorm):
        return value.fill_(1.0)
    raise TypeError(f"no initialisation rule for parameter {name} of {type(module).__name__}: add one to "
                    "longctx.model.llama.initial_value")


def _copy_into(param: torch.Tensor, full: torch.Tensor) -> None:
    param.copy_(full.to(param.device, param.dtype))


def build_model(cfg: ModelConfig, *, seq_len: int | None = None, mlp_chunks: int = 1) -> Transformer:
    """Build from config on one device. Layers in model.dilated.layers get LongNet dilated cores (single
    device until longctx.model.parallelize distributes them over the context ranks)."""
    from ..parallel.sequence.dilated import LOCAL, DilatedAttention

    validate_model(cfg)
    cores = []
    for i in range(cfg.n_layers):
        if i in cfg.dilated.layers:
            ws, rs = dilated_pattern(cfg, seq_len)
            cores.append(DilatedAttention(ws, rs, causal=True, group=LOCAL))
        else:
            cores.append(LocalAttention(window=cfg.window))
    return Transformer(cfg, cores, mlp_chunks)

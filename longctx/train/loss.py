"""Blockwise (chunked) cross-entropy: the output projection and the loss, one chunk of tokens at a time.

The (tokens x vocab) logits are the largest activation of a long-context step (at 128k tokens and a 128k
vocabulary, 64 GiB in fp32). Here they exist one chunk at a time, as in the Blockwise Parallel
Transformer: the forward computes each chunk's logits, its loss and at once its gradients with respect to
the hidden states and the output weight (softmax - one-hot), keeps those two (tokens x dim and vocab x dim,
the sizes of the inputs) and drops the logits. The backward only scales them by the incoming gradient.

With `softcap` (Gemma 2's final_logit_softcapping) the logits are soft-capped before the softmax, and
the gradient is multiplied by the cap's derivative before it leaves the chunk.

Returns the *sum* of the per-token losses over labels that are not `ignore_index`; the trainer divides by
the global count of real labels, so every layout gives the single-process mean (docs/algorithms.md §11).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.labels import IGNORE_INDEX
from ..kernels.softcap import soft_cap


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_loss(h, weight, y, ignore_index: int, acc, with_grad: bool, softcap=None):
    """(summed loss, d loss / d logits in h's dtype or None) of one chunk; the logits die on return."""
    valid = y != ignore_index
    target = torch.where(valid, y, torch.zeros_like(y))
    logits = (h @ weight.t()).to(acc)  # (chunk, vocab): the only vocab-sized tensor, one chunk at a time
    slope = None
    if softcap is not None:
        logits, slope = soft_cap(logits, softcap)
    lse = torch.logsumexp(logits, dim=-1)
    picked = logits.gather(1, target[:, None])[:, 0]
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
    if not with_grad:
        return loss, None
    # d(sum loss)/d logits = softmax - one_hot, zero on ignored rows; in place, so no second copy
    probs = logits.sub_(lse[:, None]).exp_()
    probs[torch.arange(probs.shape[0], device=probs.device), target] -= 1.0
    probs.mul_(valid[:, None].to(probs.dtype))
    if slope is not None:
        probs.mul_(slope)
    return loss, probs.to(h.dtype)


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, ignore_index: int, softcap):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _acc(hidden.dtype)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None
        for start in range(0, hidden.shape[0], chunk):
            part = _chunk_loss(hidden[start:start + chunk], weight, labels[start:start + chunk], ignore_index, acc,
                               want_h or want_w, softcap)
            total += part[0]
            if want_h:
                grad_h[start:start + chunk] = part[1] @ weight
            if want_w:
                grad_w += (part[1].t() @ hidden[start:start + chunk]).to(acc)
            del part  # this chunk's (chunk x vocab) gradient goes before the next chunk's logits exist
        ctx.save_for_backward(*(t for t in (grad_h, grad_w) if t is not None))
        ctx.want = (want_h, want_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        want_h, want_w = ctx.want
        grad_h = grad_w = None
        if want_h:
            grad_h = next(saved)
            grad_h = grad_h * grad_total.to(grad_h.dtype)
        if want_w:
            grad_w = (next(saved) * grad_total).to(ctx.weight_dtype)
        return grad_h, grad_w, None, None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, chunk: int = 1024,
                          ignore_index: int = IGNORE_INDEX, softcap: float | None = None) -> torch.Tensor:
    """Sum over real labels of cross_entropy(hidden @ weight.T, labels); hidden (T, D), weight (V, D),
    labels (T,). chunk <= 0 computes all logits at once (the plain path, for comparison). softcap: the
    logits soft-capped first (softcap * tanh(logits / softcap))."""
    if hidden.dim() != 2 or labels.dim() != 1 or hidden.shape[0] != labels.shape[0]:
        raise ValueError(f"hidden must be (tokens, dim) and labels (tokens,), got {tuple(hidden.shape)} and "
                         f"{tuple(labels.shape)}")
    if isinstance(chunk, bool) or not isinstance(chunk, int):
        raise ValueError(f"train.loss_chunk must be an int (tokens per chunk; 0 = no chunking), got {chunk!r}")
    if chunk <= 0:
        logits = (hidden @ weight.t()).to(_acc(hidden.dtype))
        if softcap is not None:
            logits = soft_cap(logits, softcap)[0]
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="sum")
    if not (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)):
        # evaluation: the loss alone (inside the Function, needs_input_grad would still ask for gradients)
        acc = _acc(hidden.dtype)
        return sum((_chunk_loss(hidden[s:s + chunk], weight, labels[s:s + chunk], ignore_index, acc, False,
                                softcap)[0]
                    for s in range(0, hidden.shape[0], chunk)), torch.zeros((), dtype=acc, device=hidden.device))
    return _ChunkedCrossEntropy.apply(hidden, weight, labels, chunk, ignore_index, softcap)


def loss_fn(chunk: int):
    """The model's loss_fn argument: (hidden (B, S, D), output weight, labels (B, S), softcap=None) -> summed
    loss (softcap: a model's output logit soft-capping). A weight split over tensor-parallel ranks (a DTensor)
    takes the vocabulary-parallel path."""
    from ..parallel.tensor import vocab_parallel_cross_entropy

    def fn(hidden, weight, labels, softcap=None):
        if hasattr(weight, "device_mesh"):
            return vocab_parallel_cross_entropy(hidden, weight, labels, chunk=chunk, ignore_index=IGNORE_INDEX,
                                                softcap=softcap)
        return chunked_cross_entropy(hidden.flatten(0, 1), weight, labels.flatten(), chunk=chunk, softcap=softcap)

    return fn

"""PyTorch's fused flash-attention kernels behind the kernel contract.

The aten ops that return the logsumexp take (batch, heads, seq, dim) and, unlike flash-attn, align
`is_causal` top-left. So a causal mask with any diagonal offset is cut into pieces the op can express
(an unmasked rectangle plus a top-left triangle), computed separately and merged exactly; empty rows are
never handed to the op. GQA runs one call per query group against the un-repeated K/V heads.

Masks the fused op cannot express are handled per call: on CPU a window or document mask goes in as an
additive `attn_mask` (the op accepts any mask), while on CUDA, and for masks too large to materialise,
the call falls back to the reference backend. `fallbacks` counts those calls so `longctx info` and the
benchmarks can say so.

On CUDA the same pieces can run on cuDNN's fused attention instead of the flash op (`cuda_op="cudnn"`, the
`cudnn` backend): on an H200 torch's cuDNN attention ran fwd+bwd 1.7x faster than its flash kernel at 16k.
That path follows the op's schema and torch's own use of it (its context-parallel ring) but has not yet run
on a GPU; `auto` does not pick it until it has passed the conformance tests there.
"""

from __future__ import annotations

import collections

import torch

from . import reference
from .mask import Mask
from .merge import acc_dtype, empty_state, merge_

_INF = float("inf")
DENSE_MASK_LIMIT = 1 << 26  # elements of an additive mask we are willing to build (256 MiB fp32)
fallbacks: collections.Counter = collections.Counter()

FALLBACK_RULES = (
    "sliding-window and document masks on CUDA",
    "fp32/fp64 inputs on CUDA (the CUDA flash op takes fp16/bf16 only)",
    "head_dim not a multiple of 8 or above 256, or a GPU before sm80 (CUDA)",
    f"window/document masks on CPU whose dense mask exceeds {DENSE_MASK_LIMIT} elements",
)


def pieces(mask: Mask, sq: int, sk: int):
    """Cut a band mask with no left edge into (q0, q1, k0, k1, causal) pieces; None if impossible.

    Every causal piece is square, so it means the same under top-left alignment (the CPU op) and
    bottom-right alignment (the CUDA op, which runs flash-attn's kernel)."""
    if mask.left is not None or mask.has_documents:
        return None
    if mask.right is None:
        return [(0, sq, 0, sk, False)]
    o = mask.diag(sq, sk) + mask.right  # row i sees keys j <= i + o
    r0 = min(sq, max(0, -o))  # rows before r0 see nothing
    # The triangle runs to the row that sees the last key (r1 - 1 = sk - 1 - o): ending it one row earlier
    # would split that row off as a piece of its own, and a square causal block would need a merge.
    r1 = max(r0, min(sq, sk - o))  # rows from r1 on see every key and more
    out = []
    if r1 > r0:
        if r0 + o > 0:
            out.append((r0, r1, 0, r0 + o, False))  # keys every middle row sees
        out.append((r0, r1, r0 + o, r1 + o, True))  # the square triangle
    if r1 < sq:
        out.append((r1, sq, 0, sk, False))
    return out


# the largest head_dim each CUDA op takes (cuDNN's limit is 128 before Hopper; kept at 128 everywhere)
MAX_HEAD_DIM = {"flash": 256, "cudnn": 128}


def cudnn_availability() -> str | None:
    """None where the `cudnn` backend can run, else why not."""
    if not hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention"):
        return f"this torch ({torch.__version__}) has no cuDNN attention op"
    if not torch.cuda.is_available():
        return "cuDNN attention runs on CUDA GPUs only; use sdpa or triton"
    if not torch.backends.cudnn.is_available() or (torch.backends.cudnn.version() or 0) < 90000:
        return f"cuDNN attention needs cuDNN 9 (found {torch.backends.cudnn.version()})"
    return None


def _fallback_reason(q: torch.Tensor, mask: Mask, sq: int, sk: int, cuda_op: str = "flash") -> str | None:
    if q.is_cuda:
        if q.dtype not in (torch.float16, torch.bfloat16):
            return "cuda-dtype"
        if pieces(mask, sq, sk) is None:
            return "cuda-mask"
        if q.shape[-1] % 8 or q.shape[-1] > MAX_HEAD_DIM[cuda_op] or \
                torch.cuda.get_device_capability(q.device)[0] < 8:
            return "cuda-shape"  # the fused ops neither pad head_dim nor run before sm80
        return None
    if pieces(mask, sq, sk) is None and q.shape[0] * sq * sk > DENSE_MASK_LIMIT:
        return "cpu-mask-size"
    return None


def _groups(q, k):
    """Yield (g, q_view) with q_view (B, Hkv, Sq, D) holding query head h*G+g of every kv head h."""
    b, sq, h, d = q.shape
    hkv = k.shape[2]
    g = h // hkv
    qv = q.view(b, sq, hkv, g, d)
    for j in range(g):
        yield j, qv[:, :, :, j].transpose(1, 2)


def _bhsd(x):
    return x.transpose(1, 2)


def cudnn_forward(q, k, v, causal, scale):
    """cuDNN's fused attention on (B, H, S, D) tensors: (out, lse (B, H, S))."""
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    return res[0], res[1].reshape(res[0].shape[:3])  # its lse is (B, H, S, 1)


def cudnn_backward(do, q, k, v, out, lse, causal, scale):
    """(dq, dk, dv) of cudnn_forward; no bias and no varlen offsets: undefined tensors (None), as torch's own
    backward passes them."""
    zero = torch.zeros((), device=q.device, dtype=torch.long)
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        do, q, k, v, out, lse.contiguous().unsqueeze(-1), zero, zero, None, None, None, q.shape[2], k.shape[2],
        0.0, causal, scale=scale)


def _op_forward(q, k, v, causal, scale, attn_mask, cuda_op="flash"):
    if q.is_cuda and cuda_op == "cudnn":
        return cudnn_forward(q, k, v, causal, scale)
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1]
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        q, k, v, 0.0, causal, attn_mask=attn_mask, scale=scale
    )


def _op_backward(do, q, k, v, out, lse, causal, scale, attn_mask, cuda_op="flash"):
    if q.is_cuda and cuda_op == "cudnn":
        return cudnn_backward(do, q, k, v, out, lse, causal, scale)
    if q.is_cuda:
        sq, sk = q.shape[2], k.shape[2]
        zero = torch.zeros((), device=q.device, dtype=torch.long)
        # cum_seq_q/k must be undefined (None), not empty: a defined tensor selects the varlen kernel
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            do, q, k, v, out, lse.contiguous(), None, None, sq, sk, 0.0, causal, zero, zero, scale=scale
        )
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        do, q, k, v, out, lse, 0.0, causal, attn_mask=attn_mask, scale=scale
    )


def _dense_bias(mask: Mask, sq: int, sk: int, dtype, device):
    allowed = mask.dense(sq, sk, device=device)  # (B|1, Sq, Sk)
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, -_INF)
    return bias[:, None], allowed.any(-1)[:, None]  # (B|1, 1, Sq, Sk), row has a key: (B|1, 1, Sq)


def forward(q, k, v, *, scale: float, mask: Mask, out_dtype=None, cuda_op: str = "flash"):
    b, sq, h, d = q.shape
    sk = k.shape[1]
    why = _fallback_reason(q, mask, sq, sk, cuda_op)
    if why:
        fallbacks[why] += 1
        return reference.forward(q, k, v, scale=scale, mask=mask, out_dtype=out_dtype)
    out_dtype = out_dtype or q.dtype
    pcs = pieces(mask, sq, sk)
    if pcs is None:  # CPU: window / documents through an additive mask
        bias, has_key = _dense_bias(mask, sq, sk, q.dtype, q.device)
        return _run(q, k, v, [(0, sq, 0, sk, False)], scale, bias, has_key, out_dtype)
    return _run(q, k, v, pcs, scale, None, None, out_dtype, cuda_op)


def _run(q, k, v, pcs, scale, bias, has_key, out_dtype, cuda_op="flash"):
    b, sq, h, _ = q.shape
    hkv = k.shape[2]
    g = h // hkv
    lse_dtype = acc_dtype(q.dtype)
    single = len(pcs) == 1 and pcs[0][:2] == (0, sq)
    if single:
        out = torch.empty(b, sq, h, v.shape[-1], dtype=out_dtype, device=q.device)
        lse = torch.empty(b, h, sq, dtype=lse_dtype, device=q.device)
    else:
        out, lse = empty_state(b, sq, h, v.shape[-1], device=q.device, dtype=lse_dtype)
    ov, lv = out.view(b, sq, hkv, g, -1), lse.view(b, hkv, g, sq)
    for j, qg in _groups(q, k):
        for q0, q1, k0, k1, causal in pcs:
            o, l = _op_forward(qg[:, :, q0:q1], _bhsd(k[:, k0:k1]), _bhsd(v[:, k0:k1]), causal, scale, bias,
                               cuda_op)
            o = o.transpose(1, 2)  # (B, c, Hkv, D)
            if single:
                ov[:, :, :, j] = o
                lv[:, :, j] = l
            else:
                merge_(ov[:, :, :, j], lv[:, :, j], o, l, rows=slice(q0, q1))  # writes through the views
    if has_key is not None:  # the op reports lse = 0 for rows with no allowed key
        lse.masked_fill_(~has_key, -_INF)
    return out.to(out_dtype), lse


def backward(dout, q, k, v, out, lse, *, scale: float, mask: Mask, grad_dtype=None, cuda_op: str = "flash"):
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    why = _fallback_reason(q, mask, sq, sk, cuda_op)
    if why:
        fallbacks[why] += 1
        return reference.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, grad_dtype=grad_dtype)
    pcs = pieces(mask, sq, sk)
    bias = None
    if pcs is None:
        bias, _ = _dense_bias(mask, sq, sk, q.dtype, q.device)
        pcs = [(0, sq, 0, sk, False)]
    g = h // hkv
    acc = acc_dtype(q.dtype)
    # The op computes P = exp(S - lse): an lse of +inf gives P = 0 for rows that saw no key anywhere.
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, _INF), lse).to(acc)
    dq = torch.zeros(b, sq, hkv, g, d, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    out = out.to(q.dtype).view(b, sq, hkv, g, -1)
    dout = dout.to(q.dtype).view(b, sq, hkv, g, -1)
    lv = lse.view(b, hkv, g, sq)
    for j, qg in _groups(q, k):
        og = out[:, :, :, j].transpose(1, 2)
        dog = dout[:, :, :, j].transpose(1, 2)
        for q0, q1, k0, k1, causal in pcs:
            gq, gk, gv = _op_backward(
                dog[:, :, q0:q1], qg[:, :, q0:q1], _bhsd(k[:, k0:k1]), _bhsd(v[:, k0:k1]),
                og[:, :, q0:q1], lv[:, :, j, q0:q1], causal, scale, bias, cuda_op,
            )
            dq[:, q0:q1, :, j] += gq.transpose(1, 2)
            dk[:, k0:k1] += gk.transpose(1, 2)
            dv[:, k0:k1] += gv.transpose(1, 2)
    return (
        dq.view(b, sq, h, d).to(grad_dtype or q.dtype),
        dk.to(grad_dtype or k.dtype),
        dv.to(grad_dtype or v.dtype),
    )

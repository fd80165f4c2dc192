"""flash-attn (Dao-AILab) behind the kernel contract, when it is installed (CUDA, fp16/bf16).

flash-attn's window_size=(left, right) is measured from the bottom-right diagonal, which is exactly the
contract's band with offset Sk - Sq; other offsets and document masks are left to other backends.
Its empty-row convention (lse = +inf) is mapped to the contract's -inf. Logit soft-capping is flash-attn's
own `softcap` (2.6 and later).
It cannot be built on the CPU machines this project is developed on: this wrapper follows flash-attn
2.x's documented interface and is exercised only where a GPU with flash-attn is present.
"""

from __future__ import annotations

import functools
import inspect

import torch

from .._optional import probe
from .registry import Backend, register

_INF = float("inf")


@functools.lru_cache(maxsize=1)
def _availability() -> str | None:
    ok, why = probe("flash_attn")
    if not ok:
        return f"flash-attn not installed ({why}); pip install 'longctx[flash]' on a CUDA machine"
    if not torch.cuda.is_available():
        return "flash-attn needs a CUDA device"
    return None


def _window(mask):
    left = -1 if mask.left is None else mask.left
    right = -1 if mask.right is None else mask.right
    return left, right


def _supports(q, k, v, mask) -> str | None:
    if not q.is_cuda:
        return "flash-attn runs on CUDA tensors only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash-attn takes fp16/bf16, got {q.dtype}"
    if mask.has_documents:
        return "document masks need the varlen API (not wired)"
    sq, sk = q.shape[1], k.shape[1]
    if mask.offset is not None and mask.offset != sk - sq:
        return "flash-attn aligns masks bottom-right only (mask.offset must be None)"
    if (mask.left is not None and mask.left < 0) or (mask.right is not None and mask.right < 0):
        return "flash-attn windows must be non-negative (no shifted-causal)"
    if any(width % 8 or width > 256 for width in (q.shape[-1], v.shape[-1])):
        return "flash-attn needs head_dim (of q/k and of v) a multiple of 8 and <= 256"
    return None


_PARAMETERS: dict[int, tuple[str, ...]] = {}  # id of a module-level flash-attn function -> its parameter names


def _parameters(fn) -> tuple[str, ...]:
    """The parameter names of a flash-attn function, looked up once (kernel calls are a hot path). flash-attn
    >= 2.6 wraps its backward in torch.library.custom_op, whose own signature is (*args, **kwargs): the
    wrapped function's are read."""
    if id(fn) not in _PARAMETERS:
        _PARAMETERS[id(fn)] = tuple(inspect.signature(getattr(fn, "_init_fn", fn)).parameters)
    return _PARAMETERS[id(fn)]


def forward(q, k, v, *, scale, mask, out_dtype=None, softcap=None):
    from flash_attn.flash_attn_interface import flash_attn_func

    left, right = _window(mask)
    cap = {}
    if softcap is not None:
        if "softcap" not in _parameters(flash_attn_func):
            raise ValueError("the installed flash-attn has no softcap (added in 2.6); upgrade it, or use "
                             "parallel.kernel=triton for soft-capped attention")
        cap = {"softcap": softcap}
    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=False, window_size=(left, right),
                                  return_attn_probs=True, **cap)
    lse = torch.where(lse == _INF, torch.full_like(lse, -_INF), lse.float())
    return out.to(out_dtype or q.dtype), lse


def backward(dout, q, k, v, out, lse, *, scale, mask, grad_dtype=None, softcap=None):
    from flash_attn import flash_attn_interface as fai

    left, right = _window(mask)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    lse = torch.where(torch.isneginf(lse), torch.full_like(lse, _INF), lse).contiguous()
    kwargs = dict(dout=dout.contiguous(), q=q, k=k, v=v, out=out.to(q.dtype).contiguous(), softmax_lse=lse,
                  dq=dq, dk=dk, dv=dv, dropout_p=0.0, softmax_scale=scale, causal=False,
                  window_size_left=left, window_size_right=right, window_size=(left, right), softcap=softcap or 0.0,
                  alibi_slopes=None, deterministic=False, rng_state=None)
    fai._flash_attn_backward(**{n: kwargs[n] for n in _parameters(fai._flash_attn_backward) if n in kwargs})
    return tuple(t.to(grad_dtype or t.dtype) for t in (dq, dk, dv))


register(Backend("flash", forward, backward, priority=30, availability=_availability, supports=_supports,
                 softcap=True, notes=["flash-attn 2.x; bottom-right band masks, fp16/bf16, CUDA only"]))

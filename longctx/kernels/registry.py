"""Backend registry, input validation and dispatch for the local attention kernel contract.

Contract (layout (batch, seq, heads, head_dim), like flash-attn):
    forward(q, k, v, *, scale, mask)                 -> (out, lse)    lse fp32 (B, H, Sq), natural log
    backward(dout, q, k, v, out, lse, *, scale, mask) -> (dq, dk, dv)
`out`/`lse` given to backward may be the global ones of a merged computation. v may be narrower or wider
than q and k (multi-head latent attention: DeepSeek-V3's 192-wide q/k and 128-wide v); out and dout then
have v's width. A backend that computes only one width gets the narrower side zero-padded (exact: zero
columns add nothing to q.k, and a zero value column gives a zero output column that is cut off).

`softcap=c` (Gemma 2's attention logit soft-capping) replaces every score s = scale q.k by c tanh(s / c)
before the mask and the softmax; lse is then the normaliser of the capped scores, so blocks still merge
exactly and a block's backward with the global (out, lse) stays exact (dS is multiplied by
1 - tanh(s / c)^2). Only backends that say so (`Backend.softcap`) are given such a call.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference, sdpa
from .mask import NO_MASK, Mask
from .merge import acc_dtype

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MASK_NAMES = {"none": Mask.none, "causal": Mask.causal, "shifted_causal": Mask.shifted_causal}


@dataclass
class Backend:
    """A local attention implementation. `availability()` and `supports()` return None or a reason."""

    name: str
    forward: Callable
    backward: Callable
    priority: int = 0  # `auto` prefers higher
    availability: Callable[[], str | None] = lambda: None
    supports: Callable[..., str | None] = lambda q, k, v, mask: None
    notes: list[str] = field(default_factory=list)
    value_width: bool = False  # computes a v head width other than q/k's itself (else: zero-padded for it)
    softcap: bool = False  # computes logit soft-capping (its forward/backward take softcap=); else never given one


_BACKENDS: dict[str, Backend] = {}
# (backend name, "fwd" | "bwd") -> kernel calls it ran in this process. Tests assert on it so that a call
# silently served by another backend is seen (with sdpa.fallbacks for the calls sdpa hands to reference).
calls: Counter = Counter()


def register(backend: Backend, *, replace: bool = False) -> Backend:
    if backend.name in _BACKENDS and not replace:
        raise ValueError(f"kernel backend {backend.name!r} is already registered; pass replace=True to override")
    if backend.name == "auto":
        raise ValueError("'auto' is reserved for automatic backend selection")
    _BACKENDS[backend.name] = backend
    return backend


def unregister(name: str) -> None:
    _BACKENDS.pop(name, None)


def backends() -> dict[str, Backend]:
    return dict(_BACKENDS)


def backends_ran() -> dict[str, int]:
    """name -> kernel calls (forward and backward) each backend ran in this process since the last reset;
    sdpa's calls it handed to reference are in `sdpa.fallbacks` (by reason) as well."""
    out: Counter = Counter()
    for (name, _), n in calls.items():
        out[name] += n
    return dict(out)


def reset_calls() -> None:
    calls.clear()
    sdpa.fallbacks.clear()


def backend_status() -> dict[str, str | None]:
    """name -> None if usable on this machine, else the reason why not."""
    return {name: b.availability() for name, b in _BACKENDS.items()}


def check_name(name: str, what: str) -> None:
    """`name` is `auto` or a registered backend; `what` ("parallel.kernel=", "--kernel ") starts the error."""
    if name != "auto" and name not in _BACKENDS:
        raise ValueError(f"{what}{name!r} is not a kernel backend; choose one of "
                         f"{', '.join(['auto', *sorted(_BACKENDS)])}")


def _unknown_backend(name) -> ValueError:
    return ValueError(f"unknown kernel backend {name!r}; choose one of {['auto', *sorted(_BACKENDS)]}")


class Probe:
    """What a backend's `supports` reads of a q/k/v (shape, dtype, device), without allocating: a launching
    process asks about its ranks' calls before they start, and must not take GPU memory for it."""

    def __init__(self, shape: tuple, dtype, device):
        self.shape, self.dtype, self.device, self.is_cuda = shape, dtype, device, device.type == "cuda"


def missing_capability(b: Backend, softcap) -> str | None:
    """Why `b` cannot take a call with this softcap (None: it can); `resolve` and the kernel bench ask it."""
    return "it does not compute logit soft-capping" if softcap is not None and not b.softcap else None


def resolve(name: str, q, k, v, mask: Mask, softcap: float | None = None) -> Backend:
    """Pick the backend for one call: a named one (checked) or the fastest that supports it."""
    if not isinstance(name, str):
        raise TypeError(f"kernel backend must be a name (str), got {type(name).__name__}")
    if name != "auto":
        if name not in _BACKENDS:
            raise _unknown_backend(name)
        b = _BACKENDS[name]
        why = b.availability() or missing_capability(b, softcap) or b.supports(q, k, v, mask)
        if why:
            raise ValueError(f"kernel backend {name!r} cannot run this call: {why}; use kernel='auto' or 'reference'")
        return b
    for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority):
        if b.priority >= 0 and not (b.availability() or missing_capability(b, softcap) or b.supports(q, k, v, mask)):
            return b
    return _BACKENDS["reference"]


def as_mask(mask) -> Mask:
    if mask is None:
        return NO_MASK
    if isinstance(mask, Mask):
        return mask
    if isinstance(mask, str):
        if mask not in MASK_NAMES:
            raise ValueError(f"unknown mask {mask!r}; use one of {sorted(MASK_NAMES)} or a longctx.kernels.Mask")
        return MASK_NAMES[mask]()
    raise TypeError(f"mask must be a longctx.kernels.Mask (e.g. Mask.causal()) or a name, got {type(mask).__name__}")


def _check_tensor(name: str, t, ndim: int = 4, what: str = "(batch, seq, heads, head_dim)"):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(
            f"{name} must be {ndim}-D {what}, got shape {tuple(t.shape)}; "
            "for (batch, heads, seq, head_dim) tensors pass x.transpose(1, 2)"
        )


def check_softcap(softcap) -> float | None:
    """None (no capping) or a positive finite float; 0 also means none (transformers' convention)."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"softcap must be None or a positive finite float (scores become softcap * tanh(score / "
                         f"softcap)), got {softcap!r}")
    return float(softcap) or None


def validate(q, k, v, scale, mask) -> tuple[float, Mask]:
    """Check a kernel call; return the resolved (scale, mask). Errors name the argument and the fix."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    if q.dtype not in FLOAT_DTYPES:
        raise TypeError(f"q has dtype {q.dtype}; attention needs one of float16, bfloat16, float32, float64")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}; cast with {name}.to(q.dtype)")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; move it with {name}.to(q.device)")
    b, sq, h, d = q.shape
    if k.shape[0] != b or v.shape[0] != b:
        raise ValueError(f"batch mismatch: q has {b}, k has {k.shape[0]}, v has {v.shape[0]}; all must be equal")
    if k.shape[1] != v.shape[1]:
        raise ValueError(f"seq mismatch: k has {k.shape[1]} keys but v has {v.shape[1]}; they must be equal")
    if k.shape[3] != d:
        raise ValueError(f"head_dim mismatch: q has {d} but k has {k.shape[3]}; q and k must be equally wide "
                         "(v may differ)")
    if d == 0:
        raise ValueError("q and k have head_dim 0; the scores need at least one feature per head")
    if v.shape[3] == 0:
        raise ValueError("v has head_dim 0; values need at least one feature")
    if k.shape[2] != v.shape[2]:
        raise ValueError(f"k has {k.shape[2]} heads but v has {v.shape[2]}; they must have the same kv heads")
    if k.shape[2] == 0 or h % k.shape[2] != 0:
        raise ValueError(
            f"heads not divisible: q has {h} heads, k/v have {k.shape[2]}; GQA needs the q heads to be a "
            "multiple of the kv heads"
        )
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float (default head_dim**-0.5), got {scale!r}")
    mask = as_mask(mask)
    mask.validate_for(b, sq, k.shape[1], q.device)
    return float(scale), mask


def forward(q, k, v, *, scale=None, mask=None, backend: str = "auto", out_dtype=None, softcap=None):
    """Local attention forward: returns (out, lse). See the module docstring for the contract."""
    scale, mask = validate(q, k, v, scale, mask)
    softcap = check_softcap(softcap)
    b = resolve(backend, q, k, v, mask, softcap)
    if q.numel() == 0 or k.numel() == 0:  # no queries or no keys: every row is empty (fused ops crash here)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), -math.inf, dtype=acc_dtype(q.dtype), device=q.device)
        return q.new_zeros((*q.shape[:3], v.shape[-1]), dtype=out_dtype or q.dtype), lse
    calls[(b.name, "fwd")] += 1
    d, dv = q.shape[-1], v.shape[-1]
    kw = dict(scale=scale, mask=mask, out_dtype=out_dtype, **_cap(softcap))
    if dv == d or b.value_width:
        return b.forward(q, k, v, **kw)
    if dv < d:
        out, lse = b.forward(q, k, _widen(v, d), **kw)
        return out[..., :dv].contiguous(), lse
    return b.forward(_widen(q, dv), _widen(k, dv), v, **kw)


def _cap(softcap) -> dict:
    # only a capping call passes the argument: backends registered without softcap support keep their signature
    return {} if softcap is None else {"softcap": softcap}


def _widen(x: torch.Tensor, width: int) -> torch.Tensor:
    """x with zero features appended up to `width` (see the module docstring: the result is unchanged)."""
    return torch.nn.functional.pad(x, (0, width - x.shape[-1]))


def backward(dout, q, k, v, out, lse, *, scale=None, mask=None, backend: str = "auto", grad_dtype=None,
             softcap=None):
    """Local attention backward given the (possibly global) out and lse: returns (dq, dk, dv)."""
    scale, mask = validate(q, k, v, scale, mask)
    softcap = check_softcap(softcap)
    _check_tensor("dout", dout)
    _check_tensor("out", out)
    want_out = (*q.shape[:3], v.shape[-1])
    if tuple(dout.shape) != want_out or tuple(out.shape) != want_out:
        raise ValueError(f"dout {tuple(dout.shape)} and out {tuple(out.shape)} must be (batch, seq_q, heads, v's "
                         f"head_dim) = {want_out}")
    want = (q.shape[0], q.shape[2], q.shape[1])
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != want:
        got = tuple(lse.shape) if isinstance(lse, torch.Tensor) else type(lse).__name__
        raise ValueError(f"lse must have shape (batch, heads, seq_q) = {want}, got {got}")
    b = resolve(backend, q, k, v, mask, softcap)
    if q.numel() == 0 or k.numel() == 0:
        return tuple(t.new_zeros(t.shape, dtype=grad_dtype or t.dtype) for t in (q, k, v))
    calls[(b.name, "bwd")] += 1
    d, dv = q.shape[-1], v.shape[-1]
    kw = dict(scale=scale, mask=mask, grad_dtype=grad_dtype, **_cap(softcap))
    if dv == d or b.value_width:
        return b.backward(dout, q, k, v, out, lse, **kw)
    if dv < d:
        gq, gk, gv = b.backward(_widen(dout, d), q, k, _widen(v, d), _widen(out, d), lse, **kw)
        return gq, gk, gv[..., :dv].contiguous()
    gq, gk, gv = b.backward(dout, _widen(q, dv), _widen(k, dv), v, out, lse, **kw)
    return gq[..., :d].contiguous(), gk[..., :d].contiguous(), gv


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, mask, backend, softcap):
        out, lse = forward(q, k, v, scale=scale, mask=mask, backend=backend, softcap=softcap)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (scale, mask, backend, softcap)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        scale, mask, backend, softcap = ctx.args
        dq, dk, dv = backward(dout.contiguous(), q, k, v, out, lse, scale=scale, mask=mask, backend=backend,
                              softcap=softcap)
        return dq, dk, dv, None, None, None, None


def attention(q, k, v, *, scale=None, mask=None, backend: str = "auto", return_lse: bool = False, softcap=None):
    """Differentiable single-device attention through the contract (the lse output is not differentiable)."""
    out, lse = _Attention.apply(q, k, v, scale, mask, backend, softcap)
    return (out, lse) if return_lse else out


def _sdpa_support(q, k, v, mask) -> str | None:
    return None  # it always runs; calls it cannot express fall back to reference and are counted


register(Backend("reference", reference.forward, reference.backward, priority=0, value_width=True,
                 softcap=True, notes=["PyTorch math, fp32/fp64 accumulation: the oracle for tests"]))
register(Backend("sdpa", sdpa.forward, sdpa.backward, priority=10, supports=_sdpa_support,
                 notes=["falls back to reference for: " + "; ".join(sdpa.FALLBACK_RULES)]))
# Below zero: `auto` never picks it. Raise it above triton once the conformance tests pass on a GPU.
register(Backend("cudnn", functools.partial(sdpa.forward, cuda_op="cudnn"),
                 functools.partial(sdpa.backward, cuda_op="cudnn"), priority=-1,
                 availability=sdpa.cudnn_availability, supports=_sdpa_support,
                 notes=["sdpa's pieces on cuDNN's fused attention (CUDA); not yet run on a GPU, never picked by "
                        "auto; head_dim <= 128, else sdpa's fallbacks"]))

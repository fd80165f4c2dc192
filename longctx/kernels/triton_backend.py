"""The `triton` kernel backend: our own FlashAttention-2-style kernels behind the kernel contract.

The kernels live in triton_kernels.py and are imported on first use only: `import longctx.kernels` must
work without triton installed, and `triton.jit` decides between compiled and interpreted kernels when the
module is imported (TRITON_INTERPRET), so that decision has to wait until we know where we run.

Where it runs:
  - CUDA tensors: compiled kernels, tile sizes autotuned per GPU (LONGCTX_TRITON_AUTOTUNE=0 pins defaults).
  - CPU tensors: only under the interpreter, and only when the caller opts in with TRITON_INTERPRET=1 and
    LONGCTX_TRITON_ON_CPU=1 (the tests do). The interpreter is far too slow for real work, and the
    registry asks `supports` the same question for `auto` and for an explicit name, so without the
    opt-in `supports` refuses CPU tensors and `auto` can never pick triton on CPU; on a CPU-only torch
    build the backend is registered explicit-only (priority -1), so not even with the opt-in.

Precision: fp32 inputs use IEEE fp32 dots (no TF32). For fp16/bf16 the kernels round P and dS to the
input dtype for the tensor-core dots, as FlashAttention does; LONGCTX_TRITON_PRECISE=1 adds a second dot
on the rounding residual (about 1.45x the matmul work) for close to fp32-accumulation accuracy.
"""

from __future__ import annotations

import importlib.util
import math
import os

import torch

from .mask import Mask
from .registry import Backend, register

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIM_MAX = 256
CPU_REASON = ("CPU tensors run only under TRITON_INTERPRET=1 with LONGCTX_TRITON_ON_CPU=1 (tests); auto never picks "
              "triton on CPU")
_INF = float("inf")
_LOG2E = 1.4426950408889634
_INTERPRET_BLOCKS = (16, 16, 1, 1)  # tiny tiles keep interpreted tests fast and exercise many tiles
_state: dict = {}


def _env(name: str) -> bool:
    return os.environ.get(name, "0") == "1"


def _kernels():
    """Import the kernel module once; on a machine without CUDA that means interpreted kernels."""
    if "mod" not in _state:
        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
        from . import triton_kernels

        _state["interpreted"] = _env("TRITON_INTERPRET")
        _state["mod"] = triton_kernels
    return _state["mod"]


def _interpreted() -> bool:
    return _state["interpreted"] if "mod" in _state else _env("TRITON_INTERPRET")


def availability() -> str | None:
    if "installed" not in _state:  # resolve("auto") asks on every kernel call: look the package up once
        _state["installed"] = importlib.util.find_spec("triton") is not None
    if not _state["installed"]:
        return "triton not installed: pip install 'longctx[triton]'"
    if not torch.cuda.is_available() and not (_env("TRITON_INTERPRET") and _env("LONGCTX_TRITON_ON_CPU")):
        # both, as supports() wants for CPU tensors: with the interpreter alone `info` said available and
        # every call was then refused
        return ("no CUDA GPU; the triton kernels run on CPU only under TRITON_INTERPRET=1 with "
                "LONGCTX_TRITON_ON_CPU=1 (tests)")
    if "error" not in _state:
        try:
            _kernels()
            _state["error"] = None
        except Exception as e:  # noqa: BLE001 - a broken install is a reason, not a crash
            _state["error"] = f"triton failed to import: {type(e).__name__}: {e}"
    return _state["error"]


def supports(q, k, v, mask: Mask) -> str | None:
    if q.dtype not in DTYPES:
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32); use 'reference' for float64"
    for what, d in (("head_dim", q.shape[-1]), ("v's head_dim", v.shape[-1])):  # each in tiles of its own width
        if not 1 <= d <= HEAD_DIM_MAX:
            return f"{what} {d} is not supported (1..{HEAD_DIM_MAX}; padded to a power of two >= 16)"
    if q.device.type == "cpu":
        if not (_env("LONGCTX_TRITON_ON_CPU") and _interpreted()):
            return CPU_REASON
    elif q.device.type != "cuda":
        return f"device {q.device.type} is not supported (cuda, or cpu under the interpreter)"
    elif "mod" in _state and _state["interpreted"]:
        return "the triton kernels were loaded interpreted (TRITON_INTERPRET=1) in this process"
    sq, sk = q.shape[1], k.shape[1]
    if q.shape[0] * q.shape[2] > 65535:  # (batch, head) is grid axis 1, which CUDA caps at 65535
        return f"batch * heads = {q.shape[0] * q.shape[2]} exceeds the kernels' grid limit of 65535"
    if 2 * (sq + sk + abs(mask.diag(sq, sk))) >= 2**31:
        return f"sequence lengths {sq}/{sk} overflow the kernels' int32 band arithmetic"
    return None


# --------------------------------------------------------------------------- tiles and bands
def band_args(mask: Mask, sq: int, sk: int) -> tuple[int, int, int]:
    """(off, left, right) as kernel ints. None becomes a bound no (i, j) pair can reach, and finite
    bounds are clamped to it, so the kernels' int32 arithmetic cannot overflow and the rule is unchanged."""
    off = mask.diag(sq, sk)
    big = sq + sk + abs(off) + 1

    def clamp(x):
        return big if x is None else max(-big, min(x, big))

    return off, clamp(mask.left), clamp(mask.right)


def tile_plan(a0: int, a_last: int, n_other: int, off: int, left: int, right: int, block: int):
    """Tile loop bounds of one program: the Python twin of triton_kernels._plan (kept identical).

    For the rows [a0, a_last] of one tile and the band -left <= j - i - off <= right, returns
    (lo_t, f0, f1, hi): partial tiles start at lo_t, lo_t + block, ... < f0, fully-allowed tiles at
    f0, ... < f1, partial tiles again at f1, ... < hi. Tiles outside [lo_t, hi) are never visited.
    The backward's key-tile programs use the same plan with (off, left, right) -> (-off, right, left).
    """
    lo = max(a0 + off - left, 0)
    hi = min(a_last + off + right + 1, n_other)
    lo_t = (lo // block) * block
    # Empty band (hi <= lo, or no key for any row when left + right < 0): run no loop at all.
    hi = hi if hi > lo and left + right >= 0 else lo_t
    full_lo = max(a_last + off - left, 0, lo_t)
    f0 = max(min(-(-full_lo // block) * block, hi), lo_t)
    f1 = max((max(min(a0 + off + right + 1, hi), 0) // block) * block, f0)
    return lo_t, f0, f1, hi


def _blocks(kind: str, d: int, dtype: torch.dtype):
    """Fixed (BLOCK_M, BLOCK_N, num_warps, num_stages), or None to autotune."""
    if _interpreted():
        return _INTERPRET_BLOCKS
    if os.environ.get("LONGCTX_TRITON_AUTOTUNE", "1") != "0":
        return None
    if dtype == torch.float32 and d > 64:  # fp32 tiles take twice the registers and shared memory
        return {"fwd": (64, 32, 4, 2), "dkdv": (32, 32, 8, 1), "dq": (32, 32, 4, 1)}[kind]
    # No register spills on sm_90 for these (ptxas resource usage, see triton_kernels.FWD_CONFIGS).
    return {"fwd": (128, 32 if d > 128 else 64, 8, 2), "dkdv": (32, 32 if d > 128 else 64, 8, 2),
            "dq": (64, 32, 8, 2)}[kind]


def _bucket(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()  # autotune once per power-of-two length, not per length


def _launch(kind: str, grid_rows: int, n_prog: int, d: int, dtype, args: list, consts: dict):
    kern = _kernels()
    blocks = _blocks(kind, d, dtype)
    row_block = "BLOCK_N" if kind == "dkdv" else "BLOCK_M"
    if blocks is None:
        fn = kern.tuned(kind)
        fn[lambda meta: (-(-grid_rows // meta[row_block]), n_prog)](*args, **consts)
        return
    bm, bn, warps, stages = blocks
    grid = (-(-grid_rows // (bn if kind == "dkdv" else bm)), n_prog)
    getattr(kern, f"{kind}_kernel")[grid](*args, **consts, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps,
                                          num_stages=stages)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return x if x.stride(-1) == 1 else x.contiguous()


def _docs(mask: Mask, b: int, device):
    if not mask.has_documents:
        # Never read (HAS_DOCS is off) but the kernel needs a pointer; cached so no call pays an allocation.
        key = ("dummy", str(device))
        if key not in _state:
            _state[key] = torch.zeros(1, dtype=torch.int32, device=device)
        return _state[key], _state[key], 0, 0
    qd, kd = mask.q_doc.contiguous(), mask.k_doc.contiguous()
    if qd.dtype != kd.dtype:
        qd, kd = qd.long(), kd.long()
    # A (1, S) id tensor is shared by the whole batch: a batch stride of 0 broadcasts it.
    return qd, kd, qd.stride(0) if qd.shape[0] == b else 0, kd.stride(0) if kd.shape[0] == b else 0


def _block(width: int) -> int:
    return max(16, 1 << (width - 1).bit_length())  # tl.dot needs >= 16; padding lanes are masked off


def _common(q, k, v, mask: Mask, softcap):
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    off, left, right = band_args(mask, sq, sk)
    consts = dict(HAS_DOCS=mask.has_documents, SOFTCAP=softcap is not None, BLOCK_D=_block(d),
                  BLOCK_DV=_block(v.shape[-1]),
                  PREC="ieee" if q.dtype == torch.float32 else "tf32",
                  UPCAST=_interpreted() and q.dtype == torch.bfloat16,
                  SPLIT=q.dtype != torch.float32 and _env("LONGCTX_TRITON_PRECISE"))
    ints = [h, h // hkv, sq, sk, d, v.shape[-1], off, left, right, _bucket(sq), _bucket(sk)]
    return consts, ints


def _score_args(scale: float, softcap) -> list[float]:
    """(qk_scale, CAP): scores in the log2 domain, or (see triton_kernels) the argument of the cap's tanh."""
    if softcap is None:
        return [scale * _LOG2E, 0.0]
    return [scale / softcap, softcap * _LOG2E]


def _device(q):
    return torch.cuda.device(q.device) if q.is_cuda else _NullCtx()


class _NullCtx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _forward(q, k, v, out, lse, scale: float, mask: Mask, visits=None, softcap=None):
    q, k, v = _rows(q), _rows(k), _rows(v)
    b, sq, h, d = q.shape
    consts, ints = _common(q, k, v, mask, softcap)
    qd, kd, s_qdb, s_kdb = _docs(mask, b, q.device)
    counter = visits if visits is not None else qd
    args = [q, k, v, out, lse, qd, kd, counter, *_score_args(scale, softcap), *q.stride()[:3], *k.stride()[:3],
            *v.stride()[:3], *out.stride()[:3], s_qdb, s_kdb, *ints]
    with _device(q):
        _launch("fwd", sq, b * h, max(d, v.shape[-1]), q.dtype, args, dict(consts, COUNT=visits is not None))


def forward(q, k, v, *, scale: float, mask: Mask, out_dtype=None, softcap=None):
    b, sq, h, _ = q.shape
    out = torch.empty((b, sq, h, v.shape[-1]), dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or k.shape[1] == 0:
        return out.zero_(), lse.fill_(-_INF)  # no keys: every row is empty
    _forward(q, k, v, out, lse, scale, mask, softcap=softcap)
    return out, lse


def backward(dout, q, k, v, out, lse, *, scale: float, mask: Mask, grad_dtype=None, softcap=None):
    q, k, v, dout, out = _rows(q), _rows(k), _rows(v), _rows(dout), _rows(out)
    b, sq, h, d = q.shape
    sk, hkv = k.shape[1], k.shape[2]
    # Every program stores its whole tile (zeros where nothing was allowed), so no memset is needed.
    alloc = torch.zeros if q.numel() == 0 or k.numel() == 0 else torch.empty
    dq = alloc(q.shape, dtype=grad_dtype or q.dtype, device=q.device)
    dk = alloc(k.shape, dtype=grad_dtype or k.dtype, device=q.device)
    dv = alloc(v.shape, dtype=grad_dtype or v.dtype, device=q.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq, dk, dv
    consts, ints = _common(q, k, v, mask, softcap)
    qd, kd, s_qdb, s_kdb = _docs(mask, b, q.device)
    lse = lse.detach().contiguous()
    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    strides = [*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *dout.stride()[:3]]
    with _device(q):
        kern = _kernels()
        rows = 16 if _interpreted() else 64
        kern.delta_kernel[(-(-sq // rows), b * h)](out, dout, delta, *out.stride()[:3], *dout.stride()[:3],
                                                   h, sq, v.shape[-1], BLOCK_D=consts["BLOCK_DV"], BLOCK_M=rows)
        qk_scale, cap = _score_args(scale, softcap)
        width = max(d, v.shape[-1])
        _launch("dkdv", sk, b * hkv, width, q.dtype,
                [q, k, v, dout, lse, delta, dk, dv, qd, kd, qk_scale, scale, cap, *strides, *dk.stride()[:3],
                 *dv.stride()[:3], s_qdb, s_kdb, *ints], consts)
        _launch("dq", sq, b * h, width, q.dtype,
                [q, k, v, dout, lse, delta, dq, qd, kd, qk_scale, scale, cap, *strides, *dq.stride()[:3],
                 s_qdb, s_kdb, *ints], consts)
    return dq, dk, dv


def tile_visits(q, k, v, *, mask: Mask, scale: float | None = None) -> torch.Tensor:
    """Debug/test hook: run the forward with fixed tiles and return, per program, the number of
    (partial, full) KV tiles it visited, shaped (B * H, num_q_tiles, 2)."""
    b, sq, h, d = q.shape
    width = max(d, v.shape[-1])  # the tiles are chosen by the wider of the two head widths, as _forward's are
    if _blocks("fwd", width, q.dtype) is None:
        raise RuntimeError("tile_visits needs fixed tiles: set LONGCTX_TRITON_AUTOTUNE=0")
    bm = _blocks("fwd", width, q.dtype)[0]
    visits = torch.zeros((b * h, -(-sq // bm), 2), dtype=torch.int32, device=q.device)
    out = torch.empty((b, sq, h, v.shape[-1]), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    _forward(q, k, v, out, lse, scale or 1.0 / math.sqrt(d), mask, visits=visits)
    return visits


def fwd_block_sizes(d: int, dtype: torch.dtype):
    """(BLOCK_M, BLOCK_N) of the fixed forward tiles for head width d (the wider of q/k's and v's), or None when
    autotuning."""
    blocks = _blocks("fwd", d, dtype)
    return None if blocks is None else blocks[:2]


# `auto` must never send CPU tensors through the interpreter, even where a test session opted in to it:
# on a CPU-only torch build the backend is explicit-only (priority < 0). The build flag is checked, not
# the device, so importing longctx.kernels never initialises CUDA (fork safety).
PRIORITY = 20 if torch.backends.cuda.is_built() else -1

register(Backend(
    "triton", forward, backward, priority=PRIORITY, availability=availability, supports=supports, softcap=True,
    value_width=True,
    notes=[
        "FlashAttention-2-style Triton kernels: band-skipped tiles, GQA without repeating K/V, "
        "deterministic dK/dV (group heads summed in one program)",
        "CUDA: tiles autotuned per GPU (LONGCTX_TRITON_AUTOTUNE=0 pins defaults); CPU: only under "
        "TRITON_INTERPRET=1 with LONGCTX_TRITON_ON_CPU=1 (tests)",
        "document masks skip only band-empty tiles (tiles of other documents are masked, not skipped)",
        "fp16/bf16 round P and dS like FlashAttention; LONGCTX_TRITON_PRECISE=1 for near-fp32 accuracy",
        "logit soft-capping (softcap=) in the same kernels, tanh from exp2",
        "values of their own width (latent attention's 192/128) in tiles of that width, no zero padding",
    ],
))

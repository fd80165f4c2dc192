"""Which kernel backend a test expects to run, and the check that it did (no silent fallback).

Triton runs on CPU tensors only under its interpreter and only with an explicit opt-in. The opt-in is
given to the tests that want Triton (the `triton_env` fixture in tests/conftest.py, and `env=` for rank
processes), never to the whole suite: otherwise `auto` would mean Triton on a CUDA build of torch without
a GPU and the rest of the suite would silently test a different kernel.
"""

from __future__ import annotations

import importlib.util

import torch

from longctx import kernels
from longctx.kernels import sdpa

CUDA = torch.cuda.is_available()
TRITON_CPU_ENV = {} if CUDA else {"TRITON_INTERPRET": "1", "LONGCTX_TRITON_ON_CPU": "1"}
HAS_TRITON = importlib.util.find_spec("triton") is not None
# What `auto` must pick on CPU tensors on any torch build: sdpa (triton needs the opt-in, flash CUDA).
AUTO_ON_CPU = "sdpa"


def expected(kernel: str, device: str = "cpu") -> str | None:
    """The backend a call naming `kernel` must run on `device`; None: any non-reference one (CUDA auto)."""
    if kernel != "auto":
        return kernel
    return AUTO_ON_CPU if device == "cpu" else None


def expected_fallbacks(backend: str, device: str, dtype, mask, head_dim: int, calls: int) -> dict:
    """sdpa's documented fallbacks to reference (longctx.kernels.sdpa.FALLBACK_RULES, restated here) for
    `calls` kernel calls of one kind: on CUDA the fused op takes fp16/bf16 only, band masks without a left
    edge only, head_dim a multiple of 8 up to 256 (128 for cudnn). On CPU nothing falls back at test sizes."""
    if backend not in ("sdpa", "cudnn") or device == "cpu":
        return {}
    if dtype not in (torch.float16, torch.bfloat16):
        return {"cuda-dtype": calls}
    if mask.left is not None or mask.q_doc is not None:
        return {"cuda-mask": calls}
    if head_dim % 8 or head_dim > (128 if backend == "cudnn" else 256):
        return {"cuda-shape": calls}
    return {}


def report() -> dict:
    """What ran in this process since kernels.reset_calls(): picklable, for rank processes to return."""
    return {"ran": kernels.backends_ran(), "fallbacks": dict(sdpa.fallbacks)}


def check_ran(rep: dict, kernel: str, device: str = "cpu", fallbacks: dict | None = None, label="",
              must_run: bool = True) -> None:
    """Exactly the expected backend ran (at least once unless `must_run` is False: a rank with nothing to
    compute), with exactly the expected sdpa fallbacks."""
    want = expected(kernel, device)
    ran = rep["ran"]
    if not ran and not must_run:
        pass
    elif want is None:
        assert ran and "reference" not in ran, (label, "auto ran", ran)
    else:
        assert set(ran) == {want} and ran[want] > 0, (label, f"expected only {want!r} to run", ran)
    assert rep["fallbacks"] == (fallbacks or {}), (label, "sdpa fallbacks", rep["fallbacks"])

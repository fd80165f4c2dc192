"""Local attention on one device: one contract, several backends (see registry.py)."""

from .mask import CAUSAL, NO_MASK, Mask
from .merge import acc_dtype, empty_state, merge, merge_, merge_many, merge_sinks, sinks_grad
from .registry import (
    Backend,
    Probe,
    as_mask,
    attention,
    backend_status,
    backends,
    backends_ran,
    backward,
    check_name,
    check_softcap,
    forward,
    missing_capability,
    register,
    reset_calls,
    resolve,
    unregister,
    validate,
)
from .softcap import soft_cap

__all__ = [
    "CAUSAL", "NO_MASK", "Mask", "acc_dtype", "empty_state", "merge", "merge_", "merge_many", "merge_sinks",
    "sinks_grad", "Backend", "Probe", "as_mask", "soft_cap", "missing_capability",
    "attention", "backend_status", "backends", "backends_ran", "backward", "check_name", "check_softcap", "forward",
    "register", "reset_calls", "resolve", "unregister", "validate",
]

from . import (
    flash_backend,  # noqa: E402,F401  (registers 'flash' when flash-attn is importable)
    triton_backend,  # noqa: F401,E402  (registers the 'triton' backend)
)

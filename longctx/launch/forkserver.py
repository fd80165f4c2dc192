"""The forkserver that simulated-cluster ranks are forked from, and what it imports before it forks them.

A rank forked from a server that has already imported torch, torch._dynamo (which every model build and
optimizer pulls in through torch's `_disable_dynamo` wrappers, and which imports triton), the trainer and,
where a launch asks for it, transformers, starts in milliseconds instead of paying seconds of imports of
its own: about 1.5 s of CPU a rank for torch._dynamo alone, 3-6 s for transformers on two cores.

The price: a module imported by the server has read its environment variables already, when the server
started, so a rank's `env=` cannot change them. Each preloaded module is therefore listed with the prefixes
of the variables it reads at import, and :func:`stale_variables` names those a launch sets differently
from the server's environment; `run` starts such a launch's ranks by spawn (a fresh interpreter that
imports everything itself) rather than let them silently ignore the setting. Triton is the one that
matters in practice: under `TRITON_INTERPRET=1` its `@triton.jit` functions, triton.language's own among
them, are created for the interpreter at import, and a rank that imported triton without it cannot run a
kernel on the CPU.
"""

from __future__ import annotations

import os
import signal
import threading

from .._signals import STOP_SIGNALS

# module -> prefixes of the environment variables it (or what it imports) reads when imported and a launch may
# want to decide. Not torch's own (TORCH_*, read by the server since it first preloaded torch: documented in
# run()), nor TORCHINDUCTOR_*: nothing here compiles, and importing torch._dynamo sets TORCHINDUCTOR_CACHE_DIR in
# whatever process imports it, so the caller's environment gains it after the server started (watched, that
# sent every later launch of the suite to spawn).
_ALWAYS = {
    "torch": (),
    "torch.distributed": (),
    "torch._dynamo": ("TORCHDYNAMO_", "TRITON_"),
    "longctx.launch.local": (),
    "longctx.train.trainer": (),  # DTensor, OmegaConf: ~0.7 s a rank
    "longctx.eval": (),
}
# imported only where a launch asks (preload): a broken or absent install must not take down every launch
_ON_REQUEST = {
    "transformers": ("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "TOKENIZERS_", "TRITON_"),
}

_requested: list[str] = []
_server_env: dict[str, str] | None = None  # os.environ when this process started the server


def preload(*modules: str) -> bool:
    """Ask the server to import `modules` (from those known to be safe to preload: transformers) before it
    forks any rank. Only a server not yet started can take them: returns False, and changes nothing, when
    this process's server is already running (its ranks then import the module themselves, as before)."""
    unknown = [m for m in modules if m not in _ON_REQUEST and m not in _ALWAYS]
    if unknown:
        raise ValueError(f"cannot preload {unknown}: the forkserver preloads only {sorted(_ON_REQUEST)} on request, "
                         "whose import-time environment variables it knows")
    if _server_env is not None:
        return all(m in _ALWAYS or m in _requested for m in modules)
    _requested.extend(m for m in modules if m in _ON_REQUEST and m not in _requested)
    return True


def modules() -> list[str]:
    """What the server imports before forking: the fixed set, then those preload() asked for."""
    return [*_ALWAYS, *_requested]


def stale_variables(child_env: dict[str, str]) -> list[str]:
    """The variables of `child_env` that a preloaded module reads at import and that differ from the server's
    environment (set, changed or removed): a forked rank would not see them. Empty before the server starts."""
    if _server_env is None:
        return []
    prefixes = tuple(p for m in modules() for p in {**_ALWAYS, **_ON_REQUEST}[m])
    names = {k for k in (*child_env, *_server_env) if k.startswith(prefixes)}
    return sorted(k for k in names if child_env.get(k) != _server_env.get(k))


def start() -> None:
    """Start the server (if it is not running) with the stop signals ignored and blocked, which it keeps
    across its exec: a scheduler signals every process of the job (scancel, systemd, `kill -- -PGID`), and a
    forkserver killed by it would report every rank dead (its sentinels close) while the ranks are still
    saving their checkpoint. Blocked here meanwhile, a signal to this process waits for its own handler
    rather than being ignored. Its children inherit both; a rank sets its own dispositions and unblocks."""
    global _server_env
    from multiprocessing import forkserver

    if _server_env is None:
        forkserver.set_forkserver_preload(modules())
        _server_env = dict(os.environ)
    if threading.current_thread() is not threading.main_thread():
        forkserver.ensure_running()
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in STOP_SIGNALS}
    try:
        forkserver.ensure_running()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)

"""Lazy imports of optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib

EXTRAS = {
    "triton": "triton",
    "flash_attn": "flash",
    "ray": "ray",
    "deepspeed": "deepspeed",
    "transformers": "hf",
    "safetensors": "hf",
    "tokenizers": "hf",
    "matplotlib": "dev",
    "tensorboard": "dev",
    "hypothesis": "dev",
}


class MissingDependency(ImportError):
    pass


def require(module: str, purpose: str = ""):
    """Import `module` or raise an ImportError that says which extra provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        extra = EXTRAS.get(top)
        hint = f"pip install 'longctx[{extra}]'" if extra else f"pip install {top}"
        what = f" for {purpose}" if purpose else ""
        raise MissingDependency(f"{top} is needed{what} but is not installed ({e}); install it with: {hint}") from e


def probe(module: str) -> tuple[bool, str]:
    """(available, version or reason) without raising, and without the log lines some packages print as they
    import (DeepSpeed's "Setting accelerator to CPU" goes to stdout, ahead of `longctx info`'s own first line)."""
    import logging

    before = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        m = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available", with its reason
        return False, f"{type(e).__name__}: {e}"
    finally:
        logging.disable(before)
    return True, str(getattr(m, "__version__", "installed"))

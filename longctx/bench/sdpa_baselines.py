"""PyTorch's own fused attention backends as benchmark baselines (`torch-flash`, `torch-efficient`,
`torch-cudnn`, `torch-math` in `longctx bench kernel --backends`).

They are not kernel backends of longctx: `F.scaled_dot_product_attention` returns no log-sum-exp, so no
schedule can merge their partials. They are here to answer one question, "how fast is the best thing torch
offers on this GPU for the same call", so `sdpa_kernel` pins one backend per name and a backend that cannot
run the call raises, which the benchmark reports as skipped with torch's reason.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import Mask

_NAMES = {"torch-flash": "FLASH_ATTENTION", "torch-efficient": "EFFICIENT_ATTENTION",
          "torch-cudnn": "CUDNN_ATTENTION", "torch-math": "MATH"}
NAMES = tuple(_NAMES)


def why_not(name: str, q, mask: Mask) -> str | None:
    """None if the baseline can be asked to run this call, else the reason."""
    if mask.has_documents or mask.left is not None or mask.offset is not None or mask.right not in (None, 0):
        return f"{name} takes full or causal masks only (is_causal), not {mask.kind}"
    from torch.nn.attention import SDPBackend

    if not hasattr(SDPBackend, _NAMES[name]):
        return f"this torch ({torch.__version__}) has no SDPBackend.{_NAMES[name]}"
    if name in ("torch-efficient", "torch-cudnn") and q.device.type != "cuda":
        return f"{name} runs on CUDA only"
    return None


def _run(name, q, k, v, causal: bool):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, _NAMES[name])):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, enable_gqa=k.shape[2] != q.shape[2])
    return out.transpose(1, 2)


def closures(name: str, q, k, v, do, mask: Mask):
    """(fwd, bwd, fwdbwd, out) for the benchmark loop: bwd reuses one forward graph."""
    causal = mask.right == 0
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    out = _run(name, *leaves, causal)

    def fwd():
        with torch.no_grad():
            return _run(name, q, k, v, causal)

    def bwd():
        return torch.autograd.grad(out, leaves, do, retain_graph=True)

    def fwdbwd():
        ls = [t.detach().requires_grad_() for t in (q, k, v)]
        return torch.autograd.grad(_run(name, *ls, causal), ls, do)

    return fwd, bwd, fwdbwd, out.detach()

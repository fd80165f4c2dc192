"""A kernel backend for tests that counts the work it really does.

`counting` wraps the reference kernel and adds up, per phase, the allowed (query, key) pairs of every call
it runs, times batch and query heads: pairs counted with the oracle's element-wise mask, not with the
planner's block table or Mask's closed forms. Schedules run on it, and their own work records
(CommStats.work) and the registry's work models are checked against these totals.
"""

from __future__ import annotations

from collections import Counter

from longctx import kernels
from longctx.kernels import reference

from . import oracle

NAME = "counting"
counted: Counter = Counter()  # phase -> pairs x batch x heads of the calls this process ran


def _pairs(q, k, mask) -> int:
    b, sq, h, _ = q.shape
    return oracle.pairs(sq, k.shape[1], b, **oracle.band(mask)) * h


def _forward(q, k, v, *, scale, mask, out_dtype=None):
    counted["fwd"] += _pairs(q, k, mask)
    return reference.forward(q, k, v, scale=scale, mask=mask, out_dtype=out_dtype)


def _backward(dout, q, k, v, out, lse, *, scale, mask, grad_dtype=None):
    counted["bwd"] += _pairs(q, k, mask)
    return reference.backward(dout, q, k, v, out, lse, scale=scale, mask=mask, grad_dtype=grad_dtype)


def install() -> None:
    """Register the backend in this process (explicit only: `auto` never picks it)."""
    if NAME not in kernels.backends():
        kernels.register(kernels.Backend(NAME, _forward, _backward, priority=-1,
                                         notes=["tests: reference, counting the pairs of every call"]))
    counted.clear()

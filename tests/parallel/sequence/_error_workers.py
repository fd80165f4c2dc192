"""Rank-side code for error tests that _workers.expect_errors cannot express (module level so the harness can
pickle it): each call is (name, kwargs) of a function below; every rank runs the same bad calls, so each
refuses before any collective, and returns (type, message) per call for the parent to assert on."""

from __future__ import annotations

import torch

from longctx.parallel import Comm, attention, context_mesh

_MESHES: dict = {}


def _mesh(ring: int, ulysses: int):
    if (ring, ulysses) not in _MESHES:  # built once per process: making a DeviceMesh is itself a collective
        _MESHES[ring, ulysses] = context_mesh(ring, ulysses)
    return _MESHES[ring, ulysses]


def unequal_shards(strategy: str, q_len: int, kv_len: int, layout: str = "contiguous", mesh=None):
    q = torch.randn(1, q_len, 4, 8)
    k = torch.randn(1, kv_len, 2, 8)
    group = _mesh(*mesh) if mesh else None
    attention(q, k, k.clone(), causal=True, strategy=strategy, layout=layout, group=group)


def make_mesh(ring, ulysses):
    context_mesh(ring, ulysses)


def hybrid_heads(mesh: tuple[int, int], h: int, hkv: int, c: int = 4, layout: str = "zigzag"):
    q = torch.randn(1, c, h, 8)
    k = torch.randn(1, c, hkv, 8)
    attention(q, k, k.clone(), causal=True, strategy="hybrid", group=_mesh(*mesh), layout=layout)


CALLS = {f.__name__: f for f in (unequal_shards, make_mesh, hybrid_heads)}


def expect_errors(calls: list[tuple[str, dict]]) -> list[tuple[str, str]]:
    out = []
    for name, kwargs in calls:
        try:
            CALLS[name](**kwargs)
            out.append(("no error", ""))
        except (ValueError, TypeError, RuntimeError) as e:
            out.append((type(e).__name__, str(e)))
    # the world group still works afterwards: no rank was left inside a collective
    out.append(("after", str(Comm.get().all_reduce(torch.ones(1), phase="check").item())))
    return out

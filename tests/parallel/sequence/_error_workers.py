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


def dilated_narrow_v(segment_lengths, dilation_rates):
    from longctx.parallel.sequence.dilated import dilated_attention

    q = torch.randn(1, 8, 2, 4)
    dilated_attention(q, q.clone(), torch.randn(1, 8, 2, 3), segment_lengths=segment_lengths,
                      dilation_rates=dilation_rates, causal=True)


CALLS = {f.__name__: f for f in (unequal_shards, make_mesh, hybrid_heads, dilated_narrow_v)}


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


def refusals_leave_the_group_usable() -> list[str]:
    """A kernel refused up front (an unknown name), one whose forward raises inside the ring loop and one whose
    backward does, each on every rank, then a valid forward + backward on the same group: what each call
    ended with. A refusal after a transfer was posted used to leave it behind, and the next collective on the
    group timed out."""
    from longctx import kernels

    ref = kernels.backends()["reference"]

    def refuse(*args, **kwargs):
        raise ValueError("this backend refuses")

    kernels.register(kernels.Backend("fails-fwd", refuse, ref.backward), replace=True)
    kernels.register(kernels.Backend("fails-bwd", ref.forward, refuse), replace=True)
    torch.manual_seed(0)
    q = torch.randn(1, 4, 2, 8, requires_grad=True)
    ended = []
    try:
        for kernel in ("bogus", "fails-fwd", "fails-bwd", "reference"):
            try:
                out = attention(q, q, q, causal=True, strategy="zigzag", layout="zigzag", kernel=kernel)
                out.sum().backward()
                ended.append("ok")
            except ValueError as e:
                ended.append(str(e).split(";")[0])
    finally:
        kernels.unregister("fails-fwd")
        kernels.unregister("fails-bwd")
    return ended


def hybrid_shard_batch(ring: int, ulysses: int) -> bool:
    """shard_batch over the hybrid mesh cuts ids, labels and positions as `shard` and hybrid_positions do
    (it passed the mesh to dist.get_rank: torch's 'group is not registered')."""
    import torch.distributed as dist

    from longctx.parallel import hybrid_positions, shard, shard_batch

    mesh = _mesh(ring, ulysses)
    n = 4 * ring * ulysses
    ids, labels = torch.arange(2 * n).view(2, n), torch.arange(2 * n).view(2, n) + 1000
    out = shard_batch(ids, labels, "zigzag", group=mesh)
    ring_group, ulysses_group = mesh.get_group("ring"), mesh.get_group("ulysses")
    want = hybrid_positions("zigzag", n, ring, ulysses, dist.get_rank(ring_group), dist.get_rank(ulysses_group))
    return (torch.equal(out["input_ids"], shard(ids, "zigzag", group=mesh)) and torch.equal(out["position_ids"], want)
            and torch.equal(out["labels"], labels[:, want]) and torch.equal(out["input_ids"], ids[:, want]))

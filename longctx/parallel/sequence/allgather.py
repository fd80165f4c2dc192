"""All-gather K/V attention (as in Llama 3 context parallelism).

Every rank gathers the whole K/V once (the transfer is posted first and the rank's own shard is computed
while it is in flight), then runs its queries against each gathered shard with the same block tables as
the ring schedules: the planner does not care whether a shard arrived by ring or by all-gather. With the
zigzag layout the causal work is balanced. Backward gathers K/V again instead of keeping the N-long copy
alive between passes, and reduce-scatters the fp32 dK/dV to their owners.
"""

from __future__ import annotations

import torch

from ... import kernels
from ...kernels import acc_dtype
from .schedule import ScheduleSpec, blocks_backward, blocks_forward, held, pack_kv, run_schedule, unpack_kv


def _shards(comm, kv, pending, parts):
    """(src, K/V of src): the own shard first, computed while the gather is still in flight."""
    yield comm.rank, kv
    pending.wait()
    for src in range(comm.world):
        if src != comm.rank:
            yield src, parts[src]


def allgather_forward(q, k, v, spec: ScheduleSpec):
    comm = spec.comm
    b, c, h, d = q.shape
    n = c * comm.world
    out, lse = kernels.empty_state(b, c, h, v.shape[-1], device=q.device, dtype=acc_dtype(q.dtype))
    kv = pack_kv(k, v)
    pending, parts = comm.all_gather(kv, phase="fwd", async_op=True)
    pairs = 0
    for src, kv_src in _shards(comm, kv, pending, parts):
        blocks = held(spec, n, comm.world, comm.rank, src, b)
        pairs += blocks_forward(q, *unpack_kv(kv_src, d), blocks, out, lse, spec)
    comm.stats.record_work("fwd", 0, pairs)
    return out.to(q.dtype), lse


def allgather_backward(dout, q, k, v, out, lse, spec: ScheduleSpec):
    comm = spec.comm
    b, c, d = q.shape[0], q.shape[1], q.shape[-1]
    n = c * comm.world
    acc = acc_dtype(q.dtype)
    kv = pack_kv(k, v)
    pending, parts = comm.all_gather(kv, phase="bwd", async_op=True)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dkv = torch.zeros((comm.world, *kv.shape), dtype=acc, device=q.device)
    pairs = 0
    for src, kv_src in _shards(comm, kv, pending, parts):
        blocks = held(spec, n, comm.world, comm.rank, src, b)
        pairs += blocks_backward(dout, q, *unpack_kv(kv_src, d), out, lse, blocks, dq, *unpack_kv(dkv[src], d), spec)
    comm.stats.record_work("bwd", 0, pairs)
    dk, dv = unpack_kv(comm.reduce_scatter(dkv, phase="bwd")[0], d)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def allgather_attention(q, k, v, spec: ScheduleSpec, sinks=None):
    return run_schedule(q, k, v, spec, allgather_forward, allgather_backward, sinks)

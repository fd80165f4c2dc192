"""Ring-family attention: ring (contiguous), zigzag and striped share this one loop.

They differ only in the token layout, and through it in the per-step block table (plan.py). Forward:
K and V travel together in one buffer, the transfer for step s+1 is posted before step s computes, and
partials merge into fp32 (out, lse) state. Backward (docs/algorithms.md §5): only q, k, v
and the global out/lse are saved; every step recomputes its blocks with the global out/lse, dQ
accumulates in fp32 locally, and fp32 dK/dV accumulators ride a second ring with the K/V block they
belong to, arriving home after W hops.
"""

from __future__ import annotations

import contextlib

import torch

from ... import kernels
from ...kernels import acc_dtype
from .plan import ring_src
from .schedule import ScheduleSpec, blocks_backward, blocks_forward, held, pack_kv, run_schedule, unpack_kv


def _blocks(spec: ScheduleSpec, n: int, src: int, batch: int):
    return held(spec, n, spec.comm.world, spec.comm.rank, src, batch)


def ring_forward(q, k, v, spec: ScheduleSpec):
    comm = spec.comm
    b, c, h, d = q.shape
    n = c * comm.world
    out, lse = kernels.empty_state(b, c, h, v.shape[-1], device=q.device, dtype=acc_dtype(q.dtype))
    kv = pack_kv(k, v)
    for s in range(comm.world):
        pending = comm.ring_exchange(kv, phase="fwd") if s < comm.world - 1 else None
        with _settled(pending):
            blocks = _blocks(spec, n, ring_src(comm.rank, s, comm.world), q.shape[0])
            comm.stats.record_work("fwd", s, blocks_forward(q, *unpack_kv(kv, d), blocks, out, lse, spec))
        if pending is not None:
            kv = pending.wait()
    return out.to(q.dtype), lse


@contextlib.contextmanager
def _settled(*pending):
    """A step's compute, with its transfers in flight: if the compute raises (a kernel refusing the call, on
    every rank alike), the transfers are completed before the error leaves, so the group is usable after
    it (a posted send/recv left behind made the next collective on the group time out)."""
    try:
        yield
    except BaseException:
        for transfer in pending:
            if transfer is not None:
                transfer.wait()
        raise


def ring_backward(dout, q, k, v, out, lse, spec: ScheduleSpec):
    comm = spec.comm
    c, d = q.shape[1], q.shape[-1]
    n = c * comm.world
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    kv = pack_kv(k, v)
    pending_dkv = None
    for s in range(comm.world):
        pending_kv = comm.ring_exchange(kv, phase="bwd") if s < comm.world - 1 else None
        blocks = _blocks(spec, n, ring_src(comm.rank, s, comm.world), q.shape[0])
        # this step's dK/dV go into a local buffer first, so the accumulator arriving with this K/V block
        # (fresh at step 0) is waited for only after the compute it travelled during
        local = torch.zeros(kv.shape, dtype=acc, device=q.device)
        with _settled(pending_kv, pending_dkv):
            pairs = blocks_backward(dout, q, *unpack_kv(kv, d), out, lse, blocks, dq, *unpack_kv(local, d), spec)
        comm.stats.record_work("bwd", s, pairs)
        if s == 0:
            dkv = local
        else:
            dkv = pending_dkv.wait()
            if any(b for _, b in blocks):  # a skipped block passes the accumulator through untouched
                dkv += local
        pending_dkv = comm.ring_exchange(dkv, phase="bwd")
        if pending_kv is not None:
            kv = pending_kv.wait()
    dk, dv = unpack_kv(pending_dkv.wait(), d)  # after W hops: the gradient of this rank's own K/V
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def ring_attention(q, k, v, spec: ScheduleSpec, sinks=None):
    """Exact attention over ring-sharded q, k, v (local shards in spec.layout); returns (out, lse)."""
    return run_schedule(q, k, v, spec, ring_forward, ring_backward, sinks)

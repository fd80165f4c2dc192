"""Every comm op counts its bytes and calls in the documented convention."""

import torch

from longctx.launch import run
from longctx.parallel import Comm


def _ops():
    comm = Comm.get()
    comm.stats.reset()
    w, r = comm.world, comm.rank
    x = torch.full((w * 2, 3), float(r))
    got = {}
    got["ring"] = comm.ring_exchange(torch.tensor([float(r)] * 4), phase="fwd").wait()[0].item()
    got["a2a"] = comm.all_to_all(x, phase="fwd")[:, 0].tolist()
    got["ag"] = [p[0, 0].item() for p in comm.all_gather(x[:2], phase="bwd")]
    got["rs"] = comm.reduce_scatter(torch.ones(w * 2, 3), phase="bwd")[0, 0].item()
    got["ar"] = comm.all_reduce(torch.tensor([float(r)]), phase="bwd", op="max").item()
    return got, comm.stats.as_dict(), comm.stats.bytes("fwd"), comm.stats.bytes("bwd"), comm.stats.calls()


def test_counts_and_values_w3():
    res = run(_ops, 3, timeout=60)
    for rank, (got, stats, fwd, bwd, calls) in enumerate(res):
        assert got["ring"] == (rank - 1) % 3
        assert got["a2a"] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]
        assert got["ag"] == [0.0, 1.0, 2.0]
        assert got["rs"] == 3.0 and got["ar"] == 2.0
        assert stats["fwd/send"] == {"calls": 1, "bytes": 16}
        assert stats["fwd/all_to_all"] == {"calls": 1, "bytes": 6 * 3 * 4 * 2 // 3}
        assert stats["bwd/all_gather"] == {"calls": 1, "bytes": 2 * 3 * 4 * 2}
        assert stats["bwd/reduce_scatter"] == {"calls": 1, "bytes": 2 * 3 * 4 * 2}
        assert stats["bwd/all_reduce_max"] == {"calls": 1, "bytes": 2 * 4 * 2 // 3}
        assert fwd == 16 + 48 and bwd == 48 + 48 + 5 and calls == 5


def _single():
    comm = Comm.get()
    comm.stats.reset()
    y = comm.ring_exchange(torch.ones(3), phase="fwd").wait()
    comm.all_gather(torch.ones(2), phase="fwd")
    return y.tolist(), comm.stats.bytes()


def test_world_one_moves_nothing():
    (vals, nbytes), = run(_single, 1, timeout=60)
    assert vals == [1.0, 1.0, 1.0] and nbytes == 0

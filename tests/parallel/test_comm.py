"""Every comm op counts its bytes and calls in the documented convention."""

import re

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
    errors = _errors({"op": lambda: comm.all_reduce(torch.ones(1), phase="fwd", op="mean")})
    return y.tolist(), comm.stats.bytes(), errors


def test_world_one_moves_nothing():
    (vals, nbytes, errors), = run(_single, 1, timeout=60)
    assert vals == [1.0, 1.0, 1.0] and nbytes == 0
    assert errors["op"] == ("ValueError", "all_reduce op must be 'sum' or 'max', got 'mean'")  # a world of one too


def _errors(calls: dict) -> dict:
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = ("no error", "")
        except (ValueError, TypeError, RuntimeError, KeyError) as e:
            out[name] = (type(e).__name__, str(e))
    return out


def _bad_calls():
    from torch.distributed.device_mesh import init_device_mesh

    comm = Comm.get()
    mesh = init_device_mesh("cpu", (comm.world, 1), mesh_dim_names=("ring", "ulysses"))
    out = _errors({
        "all_to_all": lambda: comm.all_to_all(torch.zeros(4, 2), phase="fwd"),
        "reduce_scatter": lambda: comm.reduce_scatter(torch.zeros(5, 2), phase="bwd"),
        "all_reduce": lambda: comm.all_reduce(torch.ones(1), phase="bwd", op="mean"),
        "2-D mesh": lambda: Comm.get(mesh),
    })
    out["after"] = comm.all_reduce(torch.ones(1), phase="check").item()  # no rank was left inside a collective
    return out


BAD = {
    "all_to_all": r"all_to_all needs dim 0 \(4\) divisible by the group size 3; pad or reshape x so dim 0 is a "
                  r"multiple of 3",
    "reduce_scatter": r"reduce_scatter needs dim 0 \(5\) divisible by the group size 3; pad or reshape x so dim 0 is "
                      r"a multiple of 3",
    "all_reduce": r"all_reduce op must be 'sum' or 'max', got 'mean'",
    "2-D mesh": r"a 2-D DeviceMesh \('ring', 'ulysses'\) was given where one group is needed; slice one dimension",
}


def test_bad_sizes_and_arguments_w3():
    res = run(_bad_calls, 3, timeout=60)
    assert len(res) == 3
    for rank, got in enumerate(res):
        assert got.pop("after") == 3.0, rank
        assert got.keys() == BAD.keys(), (rank, got)
        for name, pattern in BAD.items():
            typ, msg = got[name]
            assert typ == "ValueError" and re.search(pattern, msg), (rank, name, typ, msg)

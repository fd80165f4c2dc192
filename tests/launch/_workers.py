"""Module-level rank functions for tests/launch (run() pickles fn, so they cannot live in the test)."""

import collections
import ctypes
import os
import time

import torch
import torch.distributed as dist

from longctx.launch import rank_info

ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "GLOO_SOCKET_IFNAME", "LONGCTX_TEST_VAR")


def noop():
    return None


def report(scale=1.0, *, tag=None):
    """Identity of this rank plus an all_reduce, so the parent can check the group really formed."""
    rank, world_size = rank_info()
    total = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(total)
    return {
        "rank": rank,
        "world_size": world_size,
        "sum": total,
        "pid": os.getpid(),
        "tag": tag,
        "threads": torch.get_num_threads(),
        "env": {key: os.environ.get(key) for key in ENV_KEYS},
    }


def fail_on_rank(bad_rank):
    rank, _ = rank_info()
    if rank == bad_rank:
        raise ValueError("boom")
    dist.barrier()  # the healthy ranks block here until the harness kills them
    return rank


def skip_collective_on_rank0():
    rank, _ = rank_info()
    if rank == 0:
        time.sleep(3600)
    dist.all_reduce(torch.ones(4))
    return rank


def exit_on_rank(bad_rank, code):
    rank, _ = rank_info()
    if rank == bad_rank:
        os._exit(code)
    dist.all_reduce(torch.ones(4))
    return rank


def segfault_on_rank(bad_rank):
    rank, _ = rank_info()
    if rank == bad_rank:
        ctypes.string_at(0)  # reads address 0: SIGSEGV, no Python exception
    dist.all_reduce(torch.ones(4))
    return rank


def sleep_forever():
    time.sleep(3600)


def say_started_then_sleep(out_dir):
    rank, _ = rank_info()
    open(os.path.join(out_dir, f"started{rank}"), "w").close()
    time.sleep(3600)


def finish_slowly_on_sigterm(out_dir):
    """Until SIGTERM, wait; then take 3 s (longer than run()'s 2 s between SIGTERM and SIGKILL) to write a file,
    as a trainer checkpointing its step in flight does."""
    import signal

    stopped = []
    signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
    while not stopped:
        time.sleep(0.05)
    time.sleep(3)
    rank, _ = rank_info()
    with open(os.path.join(out_dir, f"rank{rank}"), "w") as f:
        f.write("saved")


def nested_tensors():
    rank, _ = rank_info()
    base = torch.arange(6, dtype=torch.float32).reshape(2, 3) + rank
    return {
        "rank": rank,
        "outer": {
            "list": [base, (base * 2, "text", 3)],
            "ordered": collections.OrderedDict(a=torch.tensor(rank), b=None),
            "grad": (base.requires_grad_() * 1.0),  # non-leaf: must come back detached
            "half": base.to(torch.float16),
        },
    }


def imports_and_triton_mode(names):
    """Which of `names` this rank had imported before its function ran, and how its Triton builds a @jit
    function (InterpretedFunction only where triton was imported under TRITON_INTERPRET=1)."""
    import sys

    before = {name: name in sys.modules for name in names}
    import triton.language.standard as standard

    return before, type(standard.cdiv).__name__


def train_with_rank_overrides(overrides_by_rank):
    """train_main on a config that differs by rank (as two torchrun nodes given other command lines would)."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from longctx.config import load
    from longctx.launch import train_main

    rank = dist.get_rank()
    cfg = load(path="configs/tiny.yaml", overrides=["train.steps=1", "train.seq_len=64", "logging.quiet=true",
                                                    "logging.tensorboard=false", *overrides_by_rank[rank]])
    return train_main(OmegaConf.to_container(cfg))

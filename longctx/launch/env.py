"""The process group a `longctx train` finds: the harness's, Ray Train's, torchrun's, or a single process's.

  already initialised   the simulated-cluster harness (longctx.launch.run) or a Ray Train worker: use it
  RANK / WORLD_SIZE set torchrun (or any env:// launcher): initialise from the environment, tear down after
  neither               one process: a world of one over an in-memory store (no port is opened)
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta

import torch
import torch.distributed as dist


def _backend() -> str:
    # gloo for CPU tensors always (metrics, object broadcasts); NCCL for CUDA tensors when there is a GPU
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


@contextlib.contextmanager
def process_group(timeout_s: float = 600.0):
    """Yield with a default process group; destroy it afterwards only if it was created here."""
    if dist.is_initialized():
        yield
        return
    timeout = timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(_backend(), timeout=timeout)
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        yield
    finally:
        from ..parallel.comm import Comm

        dist.destroy_process_group()
        Comm.forget()


def world_size_from_env() -> int:
    """The world size `longctx train` will find (before any group exists): for validating a config early."""
    if dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))

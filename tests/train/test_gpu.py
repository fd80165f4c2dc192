"""Training on a CUDA GPU (run by `make gpu-check`; skipped without a GPU): the same config on one GPU and
on the CPU gives the same losses, and the GPU run used a fused kernel, not the reference; generation on the
GPU gives the CPU's tokens."""

import pytest

from longctx.launch import run
from tests.support.backends import CUDA, check_ran

from ._workers import config, train_and_collect


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_one_gpu_trains_like_the_cpu():
    # precision pinned: `auto` would be bf16 on the GPU and fp32 on the CPU
    cfg = config("train.steps=3", "parallel.cp=1", "train.precision=fp32")
    cpu = run(train_and_collect, 1, args=([cfg],), backend="gloo", timeout=300)[0][0]
    gpu = run(train_and_collect, 1, args=([cfg],), backend="nccl", timeout=300)[0][0]
    check_ran(gpu["backends"], "auto", device="cuda")
    assert gpu["finite"] and len(gpu["losses"]) == 3
    # fp32 on both: the Triton kernels use IEEE fp32 dots, so only summation order differs
    for step, (a, b) in enumerate(zip(gpu["losses"], cpu["losses"])):
        assert abs(a - b) <= 1e-4 * abs(b), (step, a, b)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_one_gpu_generates_like_the_cpu():
    """Generation with the model and its sharded KV cache on the GPU (an NCCL group of one): the CPU's greedy
    tokens, logits within 1e-4."""
    from tests.model._gen_workers import run_cases

    case = dict(strategy="zigzag", decode="tree", lengths=[13, 6], steps=5)
    cpu = run(run_cases, 1, args=([case],), backend="gloo", timeout=300)[0][0]
    gpu = run(run_cases, 1, args=([dict(case, device="cuda")],), backend="nccl", timeout=300)[0][0]
    assert gpu["tokens"] == cpu["tokens"]
    assert (gpu["logits"] - cpu["logits"]).abs().max().item() <= 1e-4

import pytest
import torch

from ._cases import check, grid, launch


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_ulysses_exact(world):
    # heads_for(W) divides W; kv heads H, H/2 and 1 exercise split and replication
    cases = grid(["ulysses"], world)
    cases += grid(["ulysses"], world, causals=(True, False), window=5)[1::2]  # GQA causal, MHA and MQA not
    cases += [dict(c, layout="zigzag") for c in grid(["ulysses"], world, causals=(True,))[:1]]
    check(cases, launch(cases, world), world)


def test_ulysses_bf16():
    cases = [dict(c, bf16_baseline=True) for c in grid(["ulysses"], 4, causals=(True,), dtype=torch.bfloat16)]
    check(cases, launch(cases, 4), 4)

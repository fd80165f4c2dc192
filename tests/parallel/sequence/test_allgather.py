import pytest
import torch

from ._cases import check, grid, launch


@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_allgather_exact(world):
    cases = grid(["allgather"], world)
    cases += grid(["allgather"], world, causals=(True,), window=5)
    cases += [dict(c, layout="contiguous") for c in grid(["allgather"], world, causals=(True,))[:1]]
    cases += [dict(c, layout="striped") for c in grid(["allgather"], world, causals=(True,))[:1]]
    check(cases, launch(cases, world), world)


def test_allgather_bf16():
    cases = [dict(c, bf16_baseline=True) for c in grid(["allgather"], 4, causals=(True,), dtype=torch.bfloat16)]
    check(cases, launch(cases, 4), 4)

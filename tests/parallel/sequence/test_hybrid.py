import pytest
import torch

from ._cases import check, launch


def _cases(ring, uly, dtype=torch.float32, **extra):
    world = ring * uly
    h = 2 * uly
    cases = []
    for layout in ("contiguous", "zigzag", "striped"):
        for causal in (False, True):
            for hkv in (h, uly, 1):
                cases.append(dict(strategy="hybrid", mesh=(ring, uly), layout=layout, b=2, n=8 * world, h=h,
                                  hkv=hkv, d=8, causal=causal, window=None, dtype=dtype, **extra))
    return cases


@pytest.mark.parametrize("ring,uly", [(1, 1), (1, 2), (2, 1), (3, 1), (2, 2), (4, 2), (2, 4)])
def test_hybrid_exact(ring, uly):
    cases = _cases(ring, uly)
    cases += [dict(cases[3], window=5)]
    check(cases, launch(cases, ring * uly), ring * uly)


def test_hybrid_bf16():
    cases = [c for c in _cases(2, 2, torch.bfloat16, bf16_baseline=True) if c["causal"]][:3]
    check(cases, launch(cases, 4), 4)

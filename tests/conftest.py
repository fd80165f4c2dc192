import os

import pytest
import torch

from tests.support.backends import HAS_TRITON, TRITON_CPU_ENV

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def triton_env(monkeypatch):
    """Call it to opt this test (and, through the returned dict passed as `env=`, its rank processes) into
    the Triton kernels; on a machine without CUDA that means the interpreter. The rest of the suite never
    sees these variables, so `auto` picks the same backend there on every torch build."""

    def enable() -> dict:
        if not HAS_TRITON:
            pytest.skip("triton is not installed (pip install 'longctx[triton]')")
        for name, value in TRITON_CPU_ENV.items():
            monkeypatch.setenv(name, value)
        return dict(TRITON_CPU_ENV)

    return enable


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

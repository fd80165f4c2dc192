import importlib.util
import os

import pytest
import torch

from longctx.launch import forkserver
from tests.support.backends import HAS_TRITON, TRITON_CPU_ENV

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
# Many launches train Hugging Face models: the server that forks the ranks imports transformers once (the
# suite sets no HF_* variable a rank would need to see at import) instead of each rank, 3-6 s of CPU apiece.
if importlib.util.find_spec("transformers") is not None:
    forkserver.preload("transformers")


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

import pathlib

import pytest

from longctx.config import load, validate_model

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("model_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load(path=str(path))
    validate_model(cfg)


def test_context_parallel_config_builds_a_parallel_model():
    from longctx.model import build_model
    from longctx.parallel import ContextParallelAttention

    model = build_model(load(path=str(CONFIGS[-1].parent / "model_small.yaml")))
    cores = [layer.attention.core for layer in model.layers]
    assert all(isinstance(c, ContextParallelAttention) and c.strategy == "zigzag" for c in cores)

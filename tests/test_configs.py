import pathlib

import pytest

from longctx.config import load, validate_model

CONFIGS = sorted((pathlib.Path(__file__).parent.parent / "configs").glob("model_*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load(path=str(path))
    validate_model(cfg)

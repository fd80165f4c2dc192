import pytest
import torch

from longctx.config import load, validate_model
from longctx.demo import model_equivalence
from longctx.launch import run
from longctx.model import apply_context_parallel, build_model
from longctx.model.llama import rope


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    model = build_model(load())
    x = torch.randint(0, 256, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 256)
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 256  # changing the future leaves the past unchanged
    torch.testing.assert_close(model(x2)[:, :8], logits[:, :8])


def test_rope_uses_true_positions():
    x = torch.randn(1, 6, 2, 8)
    full = rope(x, torch.arange(6), 1e4)
    part = rope(x[:, [1, 4]], torch.tensor([1, 4]), 1e4)
    torch.testing.assert_close(part, full[:, [1, 4]])


@pytest.mark.parametrize("strategy", ["zigzag", "striped", "ulysses", "allgather"])
def test_context_parallel_model_matches_single_device(strategy):
    res = run(model_equivalence, 4, args=(strategy,), timeout=120)
    for err_logits, err_grad, _, _ in res:
        assert err_logits <= 1e-10 and err_grad <= 1e-10, (strategy, err_logits, err_grad)


def test_config_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        validate_model(load(overrides=["n_heads=4", "n_kv_heads=3"]))
    with pytest.raises(ValueError, match="impl"):
        validate_model(load(overrides=["attention.impl=magic"]))
    with pytest.raises(Exception, match="nonexistent"):
        load(overrides=["nonexistent=1"])
    model = build_model(load())
    apply_context_parallel(model, "ring")
    with pytest.raises(ValueError, match="already applied"):
        apply_context_parallel(model, "ring")


def test_dilated_layers_from_config():
    from longctx.parallel import DilatedAttention

    cfg = load(path=str(__import__("pathlib").Path(__file__).parents[2] / "configs" / "model_dilated.yaml"))
    model = build_model(cfg, seq_len=256)
    kinds = [type(layer.attention.core).__name__ for layer in model.layers]
    assert kinds == ["LocalAttention", "DilatedAttention", "LocalAttention", "DilatedAttention"]
    core = model.layers[1].attention.core
    assert isinstance(core, DilatedAttention) and core.segment_lengths == [64, 128, 256]
    assert core.dilation_rates == [1, 2, 4]
    x = torch.randint(0, 256, (1, 256))
    model(x).sum().backward()
    with pytest.raises(ValueError, match="segment_lengths"):
        build_model(load(overrides=["attention.impl=dilated"]))


def test_dilated_model_context_parallel_matches_single_device():
    # dilated layers need the contiguous split, so the other layers run the ring schedule
    dilated = ["attention.impl=dilated", "attention.dilated_w0=8", "attention.dilated_layers=[1]"]
    res = run(model_equivalence, 4, args=("ring", dilated, 64), timeout=120)
    for err_logits, err_grad, _, model in res:
        assert "segment_lengths=[8, 16, 32, 64]" in model and "ContextParallelAttention" in model
        assert err_logits <= 1e-10 and err_grad <= 1e-10, (err_logits, err_grad)

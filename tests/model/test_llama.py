import pytest
import torch
import torch.nn.functional as F

from longctx.config import ConfigError, load, validate_model
from longctx.model import build_model
from longctx.model.llama import FeedForward
from longctx.model.rope import rope


def _model_cfg(*overrides):
    return load(overrides=list(overrides)).model


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    model = build_model(_model_cfg())
    x = torch.randint(0, 256, (2, 12))
    logits = model(x)
    assert logits.shape == (2, 12, 256)
    x2 = x.clone()
    x2[:, 8:] = (x2[:, 8:] + 1) % 256  # changing the future leaves the past unchanged
    torch.testing.assert_close(model(x2)[:, :8], logits[:, :8])


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    model = build_model(_model_cfg("model.window=4", "model.n_layers=1"))
    x = torch.randint(0, 256, (1, 12))
    logits = model(x)
    x2 = x.clone()
    x2[:, 0] = (x2[:, 0] + 1) % 256  # token 0 is outside the window of tokens >= 4 (one layer)
    out2 = model(x2)
    torch.testing.assert_close(out2[:, 4:], logits[:, 4:])
    assert not torch.allclose(out2[:, 1:4], logits[:, 1:4])


def test_rope_uses_true_positions():
    x = torch.randn(1, 6, 2, 8)
    full = rope(x, torch.arange(6), 1e4)
    part = rope(x[:, [1, 4]], torch.tensor([1, 4]), 1e4)
    torch.testing.assert_close(part, full[:, [1, 4]])


def test_loss_path_equals_cross_entropy_of_logits():
    from longctx.train import chunked_cross_entropy

    torch.manual_seed(0)
    model = build_model(_model_cfg()).double()
    x = torch.randint(0, 256, (2, 10))
    y = torch.randint(0, 256, (2, 10))
    y[0, :3] = -100
    ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum")
    got = model(x, labels=y,
                loss_fn=lambda h, w, lab: chunked_cross_entropy(h.flatten(0, 1), w, lab.flatten(), chunk=7))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_chunked_mlp_is_the_same_function_with_the_same_gradients():
    torch.manual_seed(0)
    ff = FeedForward(8, 16).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64, requires_grad=True)
    ref = ff(x)
    (gx,) = torch.autograd.grad(ref.square().sum(), x)
    ff.chunks = 3
    out = ff(x)
    (gx2,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-14)
    torch.testing.assert_close(gx2, gx, rtol=0, atol=1e-13)


def test_config_errors():
    with pytest.raises(ConfigError, match="n_kv_heads"):
        validate_model(_model_cfg("model.n_heads=4", "model.n_kv_heads=3"))
    with pytest.raises(ConfigError, match="outside 0..1"):
        validate_model(_model_cfg("model.dilated.layers=[5]"))
    with pytest.raises(ConfigError, match="model.window must be null or a positive int"):
        validate_model(_model_cfg("model.window=0"))
    with pytest.raises(ValueError, match="segment_lengths"):
        build_model(_model_cfg("model.dilated.layers=[0]"))  # no pattern and no seq_len to derive one from


def test_dilated_layers_from_config():
    from longctx.parallel import DilatedAttention

    cfg = _model_cfg("model.n_layers=4", "model.dilated.layers=[1,3]")
    model = build_model(cfg, seq_len=256)
    kinds = [type(layer.attention.core).__name__ for layer in model.layers]
    assert kinds == ["LocalAttention", "DilatedAttention", "LocalAttention", "DilatedAttention"]
    core = model.layers[1].attention.core
    assert isinstance(core, DilatedAttention) and core.segment_lengths == [64, 128, 256]
    assert core.dilation_rates == [1, 2, 4]
    model(torch.randint(0, 256, (1, 256))).sum().backward()


def test_init_weights_draws_each_parameter_from_its_own_seeded_stream():
    def initialised(seed):
        with torch.device("meta"):
            model = build_model(_model_cfg())
        model.to_empty(device="cpu")
        model.init_weights(seed)
        return dict(model.named_parameters())

    a, again, other = initialised(5), initialised(5), initialised(6)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert all(not torch.equal(a[k], other[k]) for k in a if "norm" not in k)
    wq, w2 = a["layers.0.attention.wq.weight"], a["layers.0.feed_forward.w2.weight"]
    for w in (wq, w2):  # U(-1/sqrt(fan_in), 1/sqrt(fan_in)) as nn.Linear draws it, mean ~0
        bound = 1 / w.shape[1] ** 0.5
        assert 0.98 * bound < w.abs().max() <= bound and abs(w.mean()) < 0.02 * bound
    emb = a["tok_embeddings.weight"]  # N(0, 1)
    assert abs(emb.std() - 1) < 0.03 and abs(emb.mean()) < 0.03
    assert all(bool((a[k] == 1).all()) for k in a if "norm" in k)
    assert not torch.equal(wq, a["layers.1.attention.wq.weight"])  # each name its own stream

    model = build_model(_model_cfg())
    model.extra = torch.nn.Linear(2, 2, bias=True)  # a parameter without a rule is an error, not skipped
    with pytest.raises(TypeError, match="no initialisation rule for parameter extra.bias of Linear"):
        model.init_weights(0)

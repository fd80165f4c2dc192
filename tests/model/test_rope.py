"""RoPE scalings (model.rope_scaling): each equals transformers' rope_type of the same name, frequencies and
logits, so a stretched model exports to and loads from Hugging Face Llama configs; each changes the model
(so the comparisons can fail); bad settings name the fix."""

import pytest
import torch

from longctx.config import ConfigError, load
from longctx.model import build_model
from longctx.model.rope import rope_frequencies

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")

SCALINGS = {  # transformers' rope_parameters of each type (beyond rope_type and rope_theta)
    "linear": {"factor": 4.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "yarn": {"factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0, "original_max_position_embeddings": 16},
}
OURS = {"original_max_position_embeddings": "original_max_positions"}


def _ours(kind: str) -> list[str]:
    return [f"model.rope_scaling.type={kind}",
            *(f"model.rope_scaling.{OURS.get(k, k)}={v}" for k, v in SCALINGS[kind].items())]


@pytest.mark.parametrize("kind", list(SCALINGS))
@pytest.mark.parametrize("head_dim,theta,original", [(8, 1e4, 16), (64, 5e5, 8192), (128, 1e6, 4096)])
def test_frequencies_equal_transformers(kind, head_dim, theta, original):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = dict(SCALINGS[kind])
    if "original_max_position_embeddings" in params:
        params["original_max_position_embeddings"] = original
    hf = transformers.LlamaConfig(hidden_size=2 * head_dim, num_attention_heads=2, head_dim=head_dim,
                                  max_position_embeddings=8 * original,
                                  rope_parameters={"rope_type": kind, "rope_theta": theta, **params})
    want, want_gain = ROPE_INIT_FUNCTIONS[kind](hf, "cpu")
    ours = {"type": kind, **{OURS.get(k, k): v for k, v in params.items()}}
    got, gain = rope_frequencies(head_dim, theta, ours)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert gain == pytest.approx(want_gain, rel=1e-12)
    plain, _ = rope_frequencies(head_dim, theta)
    assert not torch.equal(got, plain)  # the scaling changes something


@pytest.mark.parametrize("kind", list(SCALINGS))
def test_a_stretched_llama_exports_and_loads_with_equal_logits(tmp_path, kind):
    from longctx.model.hf_weights import load_hf_llama, save_hf_llama

    sizes = ["model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.ffn_dim=64"]
    cfg = load(overrides=[*sizes, *_ours(kind)]).model
    torch.manual_seed(1)
    ours = build_model(cfg)
    tokens = torch.randint(0, 64, (2, 48))  # three times the original 16 positions
    save_hf_llama(ours.state_dict(), cfg, str(tmp_path / "out"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    assert hf.config.rope_parameters["rope_type"] == kind
    with torch.no_grad():
        want = ours(tokens)
        assert (hf(input_ids=tokens).logits - want).abs().max() <= 1e-5  # longctx -> HF
        back, back_cfg = load_hf_llama(str(tmp_path / "out"))  # HF -> longctx
        assert (back(tokens) - want).abs().max() == 0 and back_cfg.rope_scaling.type == kind
        plain = build_model(load(overrides=sizes).model)
        plain.load_state_dict(ours.state_dict())
        assert (plain(tokens) - want).abs().max() > 1e-4  # without the scaling: another model
    # the same config.json in the older form (rope_scaling with `type`, rope_theta beside it: Llama 2 era files)
    import json
    import shutil

    shutil.copytree(tmp_path / "out", tmp_path / "legacy")
    hf_config = json.loads((tmp_path / "legacy" / "config.json").read_text())
    rope = hf_config.pop("rope_parameters")
    hf_config.update(rope_theta=rope.pop("rope_theta"), rope_scaling=dict(rope, type=rope.pop("rope_type")))
    (tmp_path / "legacy" / "config.json").write_text(json.dumps(hf_config))
    with torch.no_grad():
        legacy, legacy_cfg = load_hf_llama(str(tmp_path / "legacy"))
        assert (legacy(tokens) - want).abs().max() == 0 and legacy_cfg.rope_scaling.type == kind


def test_a_rope_longctx_lacks_is_refused_by_name(tmp_path):
    from longctx.model.hf_weights import load_hf_llama

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=128)
    for name, rope in (("dynamic", {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}),
                       ("mscale", {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "mscale": 0.7,
                                   "original_max_position_embeddings": 32})):
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, rope_parameters=rope)).save_pretrained(
            tmp_path / name)
    with pytest.raises(ValueError, match=r"rope_type 'dynamic' has no longctx equivalent .*model.hf_path"):
        load_hf_llama(str(tmp_path / "dynamic"))
    with pytest.raises(ValueError, match=r"rope_parameters \['mscale'\] are not longctx's yarn RoPE"):
        load_hf_llama(str(tmp_path / "mscale"))
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, hidden_act="gelu")).save_pretrained(
        tmp_path / "gelu")  # nor is another activation than SwiGLU's (it loaded as silu, 8e-3 off in the logits)
    with pytest.raises(ValueError, match=r"a Llama whose MLP activation is 'gelu' has no longctx equivalent"):
        load_hf_llama(str(tmp_path / "gelu"))


@pytest.mark.parametrize("overrides,message", [
    (["model.rope_scaling.type=ntk"], r"model.rope_scaling.type='ntk': choose one of none, linear, llama3, yarn"),
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=0.5"], r"factor must be >= 1"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8"], r"needs model.rope_scaling.original_max_pos"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=8", "model.rope_scaling.original_max_positions=8",
      "model.rope_scaling.low_freq_factor=4"], r"needs 0 < low_freq_factor < high_freq_factor, got 4.0 and 4.0"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=8", "model.rope_scaling.original_max_positions=8",
      "model.rope_scaling.beta_slow=40"], r"needs 0 < beta_slow < beta_fast, got 40.0 and 32.0"),
])
def test_bad_rope_scaling_names_the_fix(overrides, message):
    from longctx.config import validate_model

    with pytest.raises(ConfigError, match=message):
        validate_model(load(overrides=overrides).model)

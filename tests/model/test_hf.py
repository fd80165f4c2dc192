"""Hugging Face causal LMs under longctx: every strategy equals the unmodified model's eager run; weights
convert both ways with equal logits; bad input names the fix."""


import pytest
import torch

from longctx.launch import run

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")

from ._hf_workers import compare_all  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


def _save(cls, cfg, path):
    torch.manual_seed(0)
    model = cls(cfg)
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": _save(transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL), root / "llama"),
        # one full and one sliding-window layer (window 5 < 32 tokens: the window really cuts)
        "qwen2": _save(transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **SMALL, use_sliding_window=True, sliding_window=5, max_window_layers=1,
            layer_types=["full_attention", "sliding_attention"]), root / "qwen2"),
        "mistral": _save(transformers.MistralForCausalLM, transformers.MistralConfig(**SMALL, sliding_window=6),
                         root / "mistral"),
    }


LAYOUTS_4 = [dict(cp=4, strategy="zigzag"), dict(cp=4, strategy="striped"), dict(cp=4, strategy="hybrid", ulysses=2),
             dict(dp_shard=2, cp=2, strategy="zigzag"), dict(tp=2, cp=2, strategy="zigzag")]


def test_every_strategy_equals_the_eager_model(hf_dirs):
    for world, layouts in ((4, LAYOUTS_4), (2, [dict(cp=2, strategy="ulysses")])):
        jobs = [(arch, path, layouts) for arch, path in hf_dirs.items()]
        results = run(compare_all, world, args=(jobs,), timeout=600)[0]
        assert [name for name, _ in results] == ["llama", "qwen2", "mistral"]
        for arch, per_layout in results:
            for r in per_layout:
                label = (arch, r["layout"])
                assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (label, r["loss"], r["ref_loss"])
                assert max(r["grad_rel_err"].values()) <= 1e-5, (label, r["grad_rel_err"])
                # under tp every projection (Qwen2's q/k/v biases too), the embedding and the output head
                # hold a piece; norms and o_proj's bias-free rows stay whole
                split = {n for n in r["grad_rel_err"] if n.endswith(("proj.weight", "q_proj.bias", "k_proj.bias",
                                                                     "v_proj.bias"))
                         or n in ("model.embed_tokens.weight", "lm_head.weight")}
                assert set(r["tp_sharded"]) == (split if r["layout"].get("tp", 1) > 1 else set()), label


def test_sliding_windows_are_applied(hf_dirs):
    """The window changes the result (so the test above could fail if it were dropped)."""
    from tests.model._hf_workers import batch

    path = hf_dirs["mistral"]
    windowed = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    full = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", sliding_window=None)
    inp, _ = batch(64)
    assert (windowed(input_ids=inp).logits - full(input_ids=inp).logits).abs().max() > 1e-3


def test_longctx_llama_and_hf_llama_weights_round_trip(tmp_path):
    from longctx.config import load
    from longctx.model import build_model
    from longctx.model.hf_weights import load_hf_llama, save_hf_llama

    cfg = load(overrides=["model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
                          "model.ffn_dim=64", "model.rope_theta=500000.0"]).model
    torch.manual_seed(1)
    ours = build_model(cfg)
    tokens = torch.randint(0, 64, (2, 40))
    save_hf_llama(ours.state_dict(), cfg, str(tmp_path / "out"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), attn_implementation="eager")
    with torch.no_grad():
        want = ours(tokens)
        assert (hf(input_ids=tokens).logits - want).abs().max() <= 1e-5  # longctx -> HF
        back, back_cfg = load_hf_llama(str(tmp_path / "out"))
        assert (back(tokens) - want).abs().max() == 0 and back_cfg.rope_theta == 500000.0
    # HF -> longctx, from a model transformers initialised
    torch.manual_seed(2)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL))
    theirs.save_pretrained(tmp_path / "theirs")
    mine, _ = load_hf_llama(str(tmp_path / "theirs"))
    with torch.no_grad():
        assert (mine(tokens) - theirs(input_ids=tokens).logits).abs().max() <= 1e-5


def test_from_pretrained_takes_the_registered_implementation(hf_dirs):
    from longctx.model.hf import register_attention

    register_attention()
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dirs["llama"], attn_implementation="longctx")
    assert model.config._attn_implementation == "longctx"
    with pytest.raises(RuntimeError, match="parallelize_hf"):  # not prepared: never silently another attention
        model(input_ids=torch.zeros(1, 4, dtype=torch.long))


def test_bad_input_names_the_fix(hf_dirs, tmp_path):
    from longctx.model.hf import check_hf_dir, parallelize_hf
    from longctx.parallel import ParallelDims

    class NoInterfaceLM(torch.nn.Module):
        pass

    with pytest.raises(ValueError, match="NoInterfaceLM does not route its attention"):
        parallelize_hf(NoInterfaceLM(), ParallelDims(world_size=1, dp_shard=1))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        check_hf_dir(str(tmp_path / "empty"))
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weights"):
        check_hf_dir(str(tmp_path / "cfg_only"))
    with pytest.raises(ValueError, match="not a directory"):
        check_hf_dir(str(tmp_path / "missing"))


def test_tensor_parallel_refuses_a_parameter_it_cannot_place(tmp_path):
    # Qwen3's per-head q/k norms: replicating them would leave their gradients unsummed over tp
    from tests.model._hf_workers import tp_error

    config = transformers.Qwen3Config(**SMALL, head_dim=8)
    path = _save(transformers.Qwen3ForCausalLM, config, tmp_path / "qwen3")
    message = run(tp_error, 2, args=(path,), timeout=120)[0]
    assert "Qwen3ForCausalLM: no tensor-parallel placement for model.layers.0.self_attn.q_norm.weight" in message

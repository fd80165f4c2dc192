"""What the Hugging Face adapter computes beyond plain attention and what it refuses (model/hf_checks.py):
Gemma 2's soft-capping and Cohere's and Granite's logit scales in the logits and the chunked loss equal to the
eager model's; configs and attention calls asking for what the kernels do not compute refused by name."""

import os
import types

import pytest
import torch

from longctx.launch import run

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")

from .test_hf import COHERE, DEEPSEEK, GEMMA2, GRANITE, SMALL, _save  # noqa: E402

# Granite's logits_scaling divides, HyperCLOVAX's multiplies (and it has post-norms and MuP multipliers of its own)
HYPERCLOVAX = transformers.HyperCLOVAXConfig(**SMALL, logits_scaling=0.25, embedding_multiplier=2.0,
                                             residual_multiplier=0.5, use_post_norm=True)


@pytest.fixture(scope="module")
def logit_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_logits")
    return {"gemma2": _save(transformers.Gemma2ForCausalLM, GEMMA2, root / "gemma2"),
            "cohere": _save(transformers.CohereForCausalLM, COHERE, root / "cohere"),
            "granite": _save(transformers.GraniteForCausalLM, GRANITE, root / "granite"),
            "hyperclovax": _save(transformers.HyperCLOVAXForCausalLM, HYPERCLOVAX, root / "hyperclovax")}


def test_soft_capping_is_computed(logit_dirs):
    # the Gemma 2 of the strategy test bends its scores and logits: without either cap the eager model's logits
    # move by more than 0.5 (its loss, over random tokens, far less), so a strategy that dropped one could not
    # equal the eager run's gradients there
    from tests.model._hf_workers import batch

    inp, _ = batch(GEMMA2.vocab_size)

    def eager_logits(**caps):
        model = transformers.AutoModelForCausalLM.from_pretrained(logit_dirs["gemma2"], attn_implementation="eager",
                                                                  **caps)
        return model(input_ids=inp).logits.detach()

    full = eager_logits()
    for cap in ("attn_logit_softcapping", "final_logit_softcapping"):
        assert (eager_logits(**{cap: None}) - full).abs().max() > 0.5, cap


def test_output_logit_transforms_reach_logits_and_loss(logit_dirs):
    # what a CausalLM's own forward does to its logits (Gemma 2's cap, Cohere's and Granite's scales) the adapter
    # does in its logits (evaluation, generation) and in the trainer's chunked loss (a scale applied to the
    # hidden states, the cap inside the loss): both equal the eager model's, one process
    from longctx.model.hf import HFCausalLM, load_hf_model, prepare_attention
    from longctx.model.hf_checks import output_scale
    from longctx.train.loss import loss_fn
    from tests.model._hf_workers import batch

    inp, labels = batch(SMALL["vocab_size"])
    for arch, scale, cap in (("gemma2", None, 2.0), ("cohere", 4.0, None), ("granite", 4.0, None),
                             ("hyperclovax", 0.25, None)):
        eager = transformers.AutoModelForCausalLM.from_pretrained(logit_dirs[arch], attn_implementation="eager")
        want = eager(input_ids=inp).logits.detach()
        want_loss = float(torch.nn.functional.cross_entropy(want.flatten(0, 1), labels.flatten(), reduction="sum"))
        adapter = HFCausalLM(load_hf_model(logit_dirs[arch]))
        prepare_attention(adapter.hf, "zigzag", None, None, "auto", 1)
        assert adapter.output_softcap == cap and output_scale(adapter.hf.config) == scale, arch
        torch.testing.assert_close(adapter(inp).detach(), want, rtol=0, atol=1e-5, msg=arch)
        got = float(adapter(inp, labels=labels, loss_fn=loss_fn(8)).detach())
        assert abs(got - want_loss) <= 1e-5 * want_loss, (arch, got, want_loss)


def test_what_longctx_would_skip_is_refused(tmp_path):
    # a logit scale that makes no finite logits is refused by name before anything runs. BitNet normalises the
    # attention output over all heads' features before o_proj, a reduction over the dimension tp splits: no
    # placement, refused under tp
    from longctx.model.hf_checks import check_hf_config, check_hf_model
    from tests.model._hf_workers import tp_error

    with pytest.raises(ValueError, match=r"GraniteForCausalLM has logits_scaling=0.0: the output logits would not "
                                         r"be finite; set a nonzero finite logits_scaling in its config.json"):
        check_hf_config(transformers.GraniteConfig(**SMALL, logits_scaling=0.0, architectures=["GraniteForCausalLM"]))
    # the loss reads lm_head.weight alone: Phi's head bias and Dory's learned logit scale would be left out of it
    with pytest.raises(ValueError, match=r"PhiForCausalLM's output head is a Linear with bias, not a bias-free Linear"):
        check_hf_model(transformers.PhiForCausalLM(transformers.PhiConfig(**SMALL)))
    with pytest.raises(ValueError, match=r"DoryForCausalLM's output head is a DoryLMHead with logit_scale, not a "
                                         r"bias-free Linear: longctx computes the loss from lm_head.weight alone"):
        check_hf_model(transformers.DoryForCausalLM(transformers.DoryConfig(**SMALL)))
    unknown = transformers.LlamaConfig(**SMALL, architectures=["LlamaForCausalLM"])
    unknown.logits_scaling = 8.0
    with pytest.raises(ValueError, match=r"LlamaForCausalLM has logits_scaling=8.0, and longctx does not know whether "
                                         r"its forward multiplies or divides"):
        check_hf_config(unknown)
    unknown.logits_scaling = 1.0  # either way a no-op
    check_hf_config(unknown)
    with pytest.raises(ValueError, match=r"has logit_scale=inf"):
        check_hf_config(transformers.CohereConfig(**SMALL, logit_scale=float("inf")))
    # a decoder not laid out as the adapter drives it, a config without the sizes longctx reads: one line each
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64,
                                                             num_hidden_layers=1, num_attention_heads=4,
                                                             word_embed_proj_dim=32))
    with pytest.raises(ValueError, match=r"OPTForCausalLM's decoder \(OPTModel\) has no embed_tokens, layers: "):
        check_hf_model(opt)
    # Phi's final norm is final_layernorm: pipeline stages could not leave it out
    from longctx.model.hf_checks import check_pipeline_split

    with pytest.raises(ValueError, match=r"PhiModel applies no final norm named `norm`.*set parallel.pp=1"):
        check_pipeline_split(transformers.PhiModel)
    check_pipeline_split(transformers.LlamaModel)
    sizes = types.SimpleNamespace(architectures=["OddForCausalLM"], vocab_size=64, hidden_size=32, num_hidden_layers=1,
                                  num_attention_heads=4)
    with pytest.raises(ValueError, match=r"OddForCausalLM's config has no intermediate_size"):
        check_hf_config(sizes)
    # layers whose mask or mixer the adapter would replace by full causal attention (linear attention)
    with pytest.raises(ValueError, match=r"Qwen3NextConfig has layers of type linear_attention \(config.json "
                                         r"layer_types\): longctx computes full_attention, sliding_attention, "
                                         r"chunked_attention layers only"):
        check_hf_config(transformers.Qwen3NextConfig(**SMALL))
    bitnet = _save(transformers.BitNetForCausalLM, transformers.BitNetConfig(**SMALL), tmp_path / "bitnet")
    deepseek = _save(transformers.DeepseekV3ForCausalLM, DEEPSEEK, tmp_path / "deepseek")
    # Cohere's q/k norms hold one weight per head (n_heads, head_dim): a norm tp would have to split, not replicate
    cohere_qk = _save(transformers.CohereForCausalLM, transformers.CohereConfig(**SMALL, use_qk_norm=True),
                      tmp_path / "cohere_qk")
    bitnet_error, deepseek_error, cohere_error = run(tp_error, 2, args=([bitnet, deepseek, cohere_qk],),
                                                     timeout=120)[0]
    assert "BitNetForCausalLM: no tensor-parallel placement for model.layers.0.self_attn.attn_sub_norm" in bitnet_error
    assert "CohereForCausalLM: no tensor-parallel placement for model.layers.0.self_attn.q_norm.weight" in cohere_error
    # latent attention's low-rank projections have no q/k/v_proj to split
    assert "DeepseekV3ForCausalLM: its decoder layers have no self_attn.q_proj" in deepseek_error


def test_attention_the_kernels_do_not_compute_is_refused_at_the_call():
    # a model whose config hides it still cannot slip an additive position bias or bidirectional attention through
    from longctx.model.hf import longctx_attention

    class Prepared(torch.nn.Module):
        is_causal = True

        def _longctx_cores(self, *a, **k):
            raise AssertionError("must be refused before the kernels run")

    q = torch.zeros(1, 2, 4, 8)
    for kwargs, pattern in (({"position_bias": q}, "an additive position bias"), ({"is_causal": False},
                                                                                  "bidirectionally")):
        with pytest.raises(ValueError, match=pattern):
            longctx_attention(Prepared(), q, q, q, None, **kwargs)
    # transformers builds no mask for this implementation: one that arrives is the module's own (Doge's dynamic
    # mask: a learned additive bias), never dropped
    with pytest.raises(ValueError, match=r"Prepared hands its attention a mask of its own \(as Doge's dynamic mask\)"):
        longctx_attention(Prepared(), q, q, q, torch.zeros(1, 4, 2, 2))


def test_the_recorded_rope_base_is_the_configs():
    """transformers 5 keeps the RoPE base in rope_parameters (per layer type for Gemma 3): the resolved config
    records it, not the 10000 a missing rope_theta attribute read as."""
    from longctx.model.hf import model_config

    llama = transformers.LlamaConfig(**SMALL, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    assert model_config(llama).rope_theta == 5e5
    gemma = transformers.Gemma3TextConfig(**SMALL, head_dim=16, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
        "full_attention": {"rope_type": "default", "rope_theta": 1e6}})
    assert model_config(gemma).rope_theta == 1e6


def test_weight_files_that_do_not_match_their_config_are_refused_by_name(tmp_path):
    """transformers initialises what the files lack (or hold in another shape) at random and says so in a log:
    longctx refuses, naming the weight; the piecewise readers (meta_init, init_from) read safetensors only."""
    import json

    from safetensors.torch import load_file, save_file

    from longctx.config import ConfigError
    from longctx.model.hf import load_hf_model
    from longctx.model.hf_load import stored_safetensors

    good = _save(transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL), tmp_path / "good")
    assert load_hf_model(good) is not None and "model.embed_tokens.weight" in stored_safetensors(good, "x")

    def variant(name, edit_weights=None, edit_config=None):
        path = tmp_path / name
        path.mkdir()
        weights = load_file(os.path.join(good, "model.safetensors"))
        config = json.loads(open(os.path.join(good, "config.json")).read())
        if edit_weights:
            edit_weights(weights)
        if edit_config:
            edit_config(config)
        save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
        (path / "config.json").write_text(json.dumps(config))
        return str(path)

    missing = variant("missing", lambda w: w.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ConfigError, match=r"has no weights for model.layers.1.mlp.down_proj.weight; its weight files "
                                          r"do not match its config.json"):
        load_hf_model(missing)
    deeper = variant("deeper", edit_config=lambda c: c.update(num_hidden_layers=3))
    with pytest.raises(ConfigError, match=r"has no weights for model.layers.2.input_layernorm.weight, "):
        load_hf_model(deeper)
    narrow = variant("narrow", lambda w: w.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(48, 32)}))
    with pytest.raises(ConfigError, match=r"its weight model.layers.0.mlp.up_proj.weight has shape \(48, 32\) where "
                                          r"its config.json makes it \(64, 32\)"):
        load_hf_model(narrow)
    empty = variant("empty")
    open(os.path.join(empty, "model.safetensors"), "w").close()
    with pytest.raises(ConfigError, match=r"its safetensors cannot be read \(.*header too small"):
        load_hf_model(empty)
    with pytest.raises(ConfigError, match=r"its safetensors cannot be read"):
        stored_safetensors(empty, "parallel.meta_init=true")
    sharded = variant("sharded")
    os.rename(os.path.join(sharded, "model.safetensors"), os.path.join(sharded, "model-00001-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00002.safetensors",
                                            "lm_head.weight": "model-00002-of-00002.safetensors"}}
    (tmp_path / "sharded" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"model-00002-of-00002.safetensors, listed in model.safetensors.index.json, "
                                          r"is not there; copy the whole directory"):
        stored_safetensors(sharded, "parallel.meta_init=true")
    binary = tmp_path / "binary"  # the older format transformers still reads
    binary.mkdir()
    torch.save(load_file(os.path.join(good, "model.safetensors")), binary / "pytorch_model.bin")
    (binary / "config.json").write_text(open(os.path.join(good, "config.json")).read())
    with pytest.raises(ConfigError, match=r"parallel.meta_init=true reads the weights of .*binary from safetensors, "
                                          r"and it has none \(only config.json, .*pytorch_model.bin\); save the model "
                                          r"with save_pretrained \(safetensors, the default\), or leave out "
                                          r"parallel.meta_init"):
        stored_safetensors(str(binary), "parallel.meta_init=true")

"""Generation from Hugging Face models through their own layers (model/hf_generate.py): context-parallel
prefill and tree/ring decoding over 1 and 2 ranks give the tokens of the unmodified model's eager greedy
generation without a cache, logits within 1e-5: sliding-window layers (Qwen2, Gemma3), per-head norms and
wide heads (Qwen3), a softmax scale that is not head_dim ** -0.5 (Gemma3), attention sinks (gpt-oss),
values narrower than keys (DeepSeek-V3's latent attention), chunked attention and position-scaled queries
(Llama 4), attention and output logits soft-capped (Gemma 2)."""

import pytest
import torch

from longctx.launch import run

from ._gen_workers import greedy_reference, hf_model, prompts, run_cases, tp_cases

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")

SMALL = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256)
LENGTHS, STEPS = [13, 6], 6  # unequal prompts; 13 + 6 tokens outgrow the window of 5


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_gen")
    made = {
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(
            **SMALL, use_sliding_window=True, sliding_window=5, max_window_layers=1,
            layer_types=["full_attention", "sliding_attention"])),
        "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **SMALL, head_dim=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=8)),
        # attention scores soft-capped in the prefill and every decode step, output logits capped (weights large
        # enough that both caps bend them)
        "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config(
            **SMALL, head_dim=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=8, initializer_range=0.2, attn_logit_softcapping=1.0, final_logit_softcapping=2.0)),
        "qwen3": (transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**SMALL, head_dim=16)),
        # attention sinks (prefill and every decode step merge them), a mixture of experts
        "gptoss": (transformers.GptOssForCausalLM, transformers.GptOssConfig(
            **dict(SMALL, intermediate_size=32), head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 1e4})),
        # multi-head latent attention: a cache of 12-wide keys and 6-wide values
        "deepseek": (transformers.DeepseekV3ForCausalLM, transformers.DeepseekV3Config(
            **dict(SMALL, num_key_value_heads=4), q_lora_rank=16, kv_lora_rank=8, qk_rope_head_dim=4,
            qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
            moe_intermediate_size=16, first_k_dense_replace=1, n_group=1, topk_group=1)),
        # chunked attention (a decode step sees its own chunk of the cache) and position-scaled queries
        "llama4": (transformers.Llama4ForCausalLM, transformers.Llama4TextConfig(
            **dict(SMALL, intermediate_size_mlp=64), head_dim=8, num_local_experts=2, num_experts_per_tok=1,
            no_rope_layers=[1, 0], attention_chunk_size=8, attn_temperature_tuning=True, floor_scale=4,
            attn_scale=0.5)),
    }
    out = {}
    for name, (cls, cfg) in made.items():
        torch.manual_seed(0)
        model = cls(cfg)
        for p in (p for n, p in model.named_parameters() if n.endswith(".sinks")):
            p.data = 2 * torch.randn(p.shape)  # well away from 0, so a dropped sink changes the tokens
        model.save_pretrained(root / name)
        eager = transformers.AutoModelForCausalLM.from_pretrained(root / name, attn_implementation="eager")
        out[name] = (str(root / name), [greedy_reference(eager, p, STEPS) for p in prompts(LENGTHS)])
    return out


def _same(ref, tokens, logits, label):
    for row, (want_tokens, want_logits) in enumerate(ref):
        assert tokens[row] == want_tokens.tolist(), (label, row)
        err = (logits[:, row] - want_logits).abs().max().item()
        assert err <= 1e-5, (label, row, err)


def test_one_process(models):
    for name, (path, ref) in models.items():
        res = hf_model(path).generate(prompts(LENGTHS), max_new_tokens=STEPS, return_logits=True)
        _same(ref, [t.tolist() for t in res.tokens], torch.stack(res.logits), name)


def test_context_parallel_prefill_and_decoding(models):
    # zigzag prefill + tree decoding for every model; striped + ring decoding for one (the decode step is the
    # model's, the decoding scheme longctx's: test_generate.py covers the schemes)
    jobs = [(name, "zigzag", "tree") for name in models] + [("gemma3", "striped", "ring"),
                                                             ("gemma2", "striped", "ring"),
                                                             ("deepseek", "striped", "ring"),
                                                             ("llama4", "striped", "ring")]
    cases = [dict(hf=models[n][0], strategy=s, decode=d, lengths=LENGTHS, steps=STEPS) for n, s, d in jobs]
    for rank, per_rank in enumerate(run(run_cases, 2, args=(cases,), timeout=300)):
        for (name, strategy, decode), r in zip(jobs, per_rank, strict=True):
            _same(models[name][1], r["tokens"], r["logits"], (strategy, decode, rank, name))
            assert r["decode_bytes_per_token"] > 0  # attention over the cache crossed the ranks


def test_tensor_parallel_split_generates_like_the_eager_model(models):
    """The HF model split over tp=2 for inference (heads, hidden units and vocabulary; no sequence
    parallelism, which one decode token cannot have) with the prompt over cp=2: Qwen3's per-head norms,
    Gemma3's tied head and sliding layers, Qwen2 with ring decoding. The training split is refused."""
    jobs = [("qwen3", "zigzag", "tree"), ("gemma3", "zigzag", "tree"), ("qwen2", "striped", "ring")]
    cases = [dict(hf=models[n][0], tp=2, strategy=s, decode=d, lengths=LENGTHS, steps=STEPS) for n, s, d in jobs]
    cases.append(dict(hf=models["qwen2"][0], tp=2, sp=True, lengths=LENGTHS))
    for rank, per_rank in enumerate(run(tp_cases, 4, args=(cases,), timeout=300)):
        for (name, strategy, decode), r in zip(jobs, per_rank):
            _same(models[name][1], r["tokens"], r["logits"], (strategy, decode, rank, name))
            assert r["local_wq"][0] == 4 * (16 if name != "qwen2" else 8) // 2  # half of the query rows
            assert r["prompt_len"] == 13  # 12 prefill tokens split over cp=2 zigzag (4 | 12); tp needs no padding
        assert "sequence_parallel=False" in per_rank[3]["error"]


def test_generate_leaves_the_callers_model_as_it_was_and_refuses_what_it_cannot_pin(tmp_path):
    """After HFCausalLM(hf).generate the caller's model still runs its own attention (it was left on longctx's,
    and failed at its next call); a RoPE that rescales with each call's length is refused on any number of
    ranks (a prompt's continuation would depend on the batch and on earlier calls); bad inputs are
    ValueErrors naming the argument, not an IndexError or a NaN inside sampling."""
    from longctx.model.hf import HFCausalLM
    from longctx.model.hf_checks import model_eos_ids

    torch.manual_seed(0)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**SMALL)).eval()
    before = hf.config._attn_implementation
    x = torch.tensor([[5, 9, 12, 3]])
    want = hf(x).logits
    HFCausalLM(hf).generate([x[0]], max_new_tokens=2)
    assert hf.config._attn_implementation == before
    assert torch.allclose(hf(x).logits, want)
    model = HFCausalLM(hf)
    for kwargs, message in [(dict(temperature=float("nan")), "temperature must be a finite number"),
                            (dict(pad_id=48), "pad_id=48 is outside the model's vocabulary 0..47"),
                            (dict(prompts=[torch.tensor([5.7, 9.2])]), "integer token ids"),
                            (dict(prompts=[torch.tensor([5, 48])]), "prompt 0 has token id 48, outside")]:
        with pytest.raises(ValueError, match=message):
            model.generate(kwargs.pop("prompts", [x[0]]), max_new_tokens=1, **kwargs)
    assert hf.config._attn_implementation == before
    dynamic = transformers.LlamaConfig(**SMALL, rope_parameters={"rope_type": "dynamic", "factor": 2.0,
                                                                "rope_theta": 1e4})
    with pytest.raises(ValueError, match=r"rope_type='dynamic'.* depend on the other prompts"):
        HFCausalLM(transformers.LlamaForCausalLM(dynamic)).generate([x[0]], max_new_tokens=1)
    (tmp_path / "config.json").write_text('{"eos_token_id": 7}')
    assert model_eos_ids(str(tmp_path)) == [7]
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [3, 9]}')  # what generate reads first
    assert model_eos_ids(str(tmp_path)) == [3, 9]

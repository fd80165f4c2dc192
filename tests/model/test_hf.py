"""Hugging Face causal LMs under longctx: every strategy equals the unmodified model's eager run; weights
convert both ways with equal logits; bad input names the fix."""


import pytest
import torch

from longctx.launch import run

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")

from ._hf_workers import compare_all  # noqa: E402

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)


ROPES = [("dynamic", 16, {"factor": 2.0}),
         ("longrope", 128, {"short_factor": [1.0] * 4, "long_factor": [6.0, 4.0, 3.0, 2.0],
                            "original_max_position_embeddings": 30})]


DEEPSEEK = transformers.DeepseekV3Config(**dict(SMALL, num_key_value_heads=4), q_lora_rank=16, kv_lora_rank=8,
                                         qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=4,
                                         num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=16,
                                         first_k_dense_replace=1, n_group=1, topk_group=1)


LLAMA4 = transformers.Llama4TextConfig(**dict(SMALL, intermediate_size_mlp=64), head_dim=8, num_local_experts=2,
                                       num_experts_per_tok=1, no_rope_layers=[1, 0], attention_chunk_size=8,
                                       attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5)


# per-layer inputs from a table of this vocabulary (its default, Gemma's 262144 x 2 x 256, was 134M parameters:
# ninety seconds of the suite)
SMALL_PER_LAYER = dict(vocab_size_per_layer_input=64, hidden_size_per_layer_input=8)
GEMMA4 = transformers.Gemma4TextConfig(**SMALL, **SMALL_PER_LAYER, head_dim=8, global_head_dim=16, sliding_window=5,
                                       layer_types=["sliding_attention", "full_attention"])


GEMMA2 = transformers.Gemma2Config(**SMALL, head_dim=16, sliding_window=5, query_pre_attn_scalar=8,
                                   layer_types=["sliding_attention", "full_attention"], initializer_range=0.2,
                                   attn_logit_softcapping=1.0, final_logit_softcapping=2.0)

COHERE = transformers.CohereConfig(**SMALL, logit_scale=4.0)
GRANITE = transformers.GraniteConfig(**SMALL, logits_scaling=0.25, embedding_multiplier=2.0, residual_multiplier=0.5,
                                     attention_multiplier=0.2)


def _save(cls, cfg, path, sinks: float | None = None):
    torch.manual_seed(0)
    model = cls(cfg)
    for name, p in model.named_parameters():
        if sinks is not None and name.endswith(".sinks"):
            p.data = sinks * torch.randn(p.shape)
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
        # per-head q/k norms, and heads wider than hidden_size / heads (16 > 8)
        "qwen3": _save(transformers.Qwen3ForCausalLM, transformers.Qwen3Config(**SMALL, head_dim=16), root / "qwen3"),
        # per-head norms, norms around the MLP, a tied head, scaled embeddings, a sliding and a full layer, and
        # a softmax scale that is not head_dim ** -0.5 (query_pre_attn_scalar 8, head_dim 16)
        "gemma3": _save(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(
            **SMALL, head_dim=16, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=8), root / "gemma3"),
        # Gemma 2: attention and output logits soft-capped, with weights large enough (initializer_range 0.2)
        # that both caps bend the scores and logits (test_hf_checks.py: test_soft_capping_is_computed)
        "gemma2": _save(transformers.Gemma2ForCausalLM, GEMMA2, root / "gemma2"),
        # output logits scaled by the CausalLM's forward: Cohere multiplies (logit_scale; its decoder layers run
        # attention and MLP side by side), Granite divides (logits_scaling; with multipliers on the embeddings,
        # the residual branches and the softmax scale)
        "cohere": _save(transformers.CohereForCausalLM, COHERE, root / "cohere"),
        "granite": _save(transformers.GraniteForCausalLM, GRANITE, root / "granite"),
        # attention sinks (a learned per-head logit in every softmax, set well away from 0 so they matter),
        # a mixture of experts, alternating sliding and full layers
        "gptoss": _save(transformers.GptOssForCausalLM, transformers.GptOssConfig(
            **dict(SMALL, intermediate_size=32), head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 1e4}), root / "gptoss", sinks=2.0),
        # multi-head latent attention (q/k 12 wide: 8 without RoPE + 4 with, v 6 wide; low-rank q and kv), a
        # mixture of experts with a shared expert after one dense layer
        "deepseek": _save(transformers.DeepseekV3ForCausalLM, DEEPSEEK, root / "deepseek"),
        # Llama 4: chunked attention (chunks of 8 < 32 tokens) on its RoPE layer, and on its no-RoPE layer queries
        # scaled by position (floor_scale 4, so the scale grows inside 32 tokens); per-head norms, experts
        "llama4": _save(transformers.Llama4ForCausalLM, LLAMA4, root / "llama4"),
        # a trainable parameter no step gives a gradient (the router's e_score_correction_bias): DDP's reducer
        # left every gradient unreduced for it before it searched for unused parameters (100% gradient error)
        "ernie_moe": _save(transformers.Ernie4_5_MoeForCausalLM, transformers.Ernie4_5_MoeConfig(
            **SMALL, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1, moe_intermediate_size=16,
            moe_layer_start_index=1), root / "ernie_moe"),
        # per-layer head widths (heterogeneous config: the full layer's heads 16 wide, the sliding one's 8), a
        # per-layer input embedding
        "gemma4": _save(transformers.Gemma4ForCausalLM, GEMMA4, root / "gemma4"),
        # windows transformers applies through its mask alone, never passed to the attention call: Qwen2-MoE's
        # sliding layer (layer_types), PhiMoE's every layer (its config's sliding_window)
        "qwen2_moe": _save(transformers.Qwen2MoeForCausalLM, transformers.Qwen2MoeConfig(
            **SMALL, use_sliding_window=True, sliding_window=5, layer_types=["sliding_attention", "full_attention"],
            num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),
            root / "qwen2_moe"),
        "phimoe": _save(transformers.PhimoeForCausalLM, transformers.PhimoeConfig(
            **SMALL, sliding_window=5, num_local_experts=4, num_experts_per_tok=2), root / "phimoe"),
        # RoPEs that rescale themselves by each call's largest position (pinned to N = 32 by parallelize_hf):
        # dynamic NTK grows past 16 positions; longrope switches to its long factors past 30, so a zigzag
        # shard whose last position is below 30 would take the short ones
        **{f"llama_{kind}": _save(transformers.LlamaForCausalLM, transformers.LlamaConfig(
            **dict(SMALL, max_position_embeddings=maximum), rope_parameters={"rope_type": kind, "rope_theta": 1e4,
                                                                              **extra}), root / kind)
           for kind, maximum, extra in ROPES},
    }


LAYOUTS_4 = [dict(cp=4, strategy="zigzag"), dict(cp=4, strategy="striped"), dict(cp=4, strategy="hybrid", ulysses=2),
             dict(dp_shard=2, cp=2, strategy="zigzag"), dict(tp=2, cp=2, strategy="zigzag")]


# what Qwen3 and Gemma3 add is the architecture's (per-head norms, scale, MLP norms, tp placements), not a
# strategy's: one context-parallel layout and tensor parallelism (suite time); the RoPE models: zigzag
NEWER = ("qwen3", "gemma3")


# architectures whose point is not a strategy's: no second (W=2 Ulysses) run (suite time)
WORLD_4_ONLY = NEWER + ("qwen2_moe", "phimoe", "gemma4", "gemma2", "cohere", "granite")


def _layouts(arch: str, layouts: list[dict]) -> list[dict]:
    if arch.startswith("llama_"):
        return layouts[:1]
    if arch == "gptoss":  # zigzag and hybrid (sinks split by heads); no tp placement for a mixture of experts
        return [layout for layout in layouts if layout.get("strategy") in ("zigzag", "hybrid", "ulysses")
                and "tp" not in layout and "dp_shard" not in layout]
    if arch in ("deepseek", "llama4"):  # no tp for their experts (refused); striped adds nothing here
        return [layout for layout in layouts if "tp" not in layout and layout.get("strategy") != "striped"]
    if arch in ("qwen2_moe", "phimoe"):
        return layouts[:1]
    if arch == "gemma4":  # no tp placement for its per-layer inputs (refused)
        return [layouts[0], layouts[3]]
    if arch in ("cohere", "granite"):  # their logit scales under tp's vocabulary-parallel loss (Cohere's parallel
        return [layouts[-1]]  # block: attention and MLP both of the one norm's gathered output)
    if arch == "gemma2":  # soft-capping in the ring, in Ulysses' local call (hybrid), and tp's logits
        return [layouts[0], layouts[2], layouts[-1]]
    if arch == "ernie_moe":  # DDP (cp only) and FSDP2
        return [layout for layout in layouts if layout.get("strategy") in ("zigzag", "ulysses") and "tp" not in layout]
    return [layouts[0], layouts[-1]] if arch in NEWER else layouts


def test_every_strategy_equals_the_eager_model(hf_dirs):
    for world, layouts in ((4, LAYOUTS_4), (2, [dict(cp=2, strategy="ulysses")])):
        jobs = [(arch, path, _layouts(arch, layouts)) for arch, path in hf_dirs.items()
                if world == 4 or arch not in WORLD_4_ONLY and not arch.startswith("llama_")]
        results = run(compare_all, world, args=(jobs,), timeout=600)[0]
        assert [name for name, _ in results] == [arch for arch, *_ in jobs]
        for arch, per_layout in results:
            for r in per_layout:
                label = (arch, r["layout"])
                assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"]), (label, r["loss"], r["ref_loss"])
                assert max(r["grad_rel_err"].values()) <= 1e-5, (label, r["grad_rel_err"])
                # under tp every projection (Qwen2's q/k/v biases too), the embedding and the output head
                # hold a piece; norms (per-head and Gemma's around the MLP too) and o_proj's bias-free rows
                # stay whole
                split = {n for n in r["grad_rel_err"] if n.endswith(("proj.weight", "q_proj.bias", "k_proj.bias",
                                                                     "v_proj.bias"))
                         or n in ("model.embed_tokens.weight", "lm_head.weight")}
                assert set(r["tp_sharded"]) == (split if r["layout"].get("tp", 1) > 1 else set()), label


def test_a_self_rescaling_rope_is_pinned_to_one_length(hf_dirs):
    """pin_rope_length: a context shard (zigzag rank 1 of 4) and packed documents (RoPE restarting inside
    the sequence) rotate by the frequencies of the whole 32-token sequence; unpinned they would not (so the
    layouts above could fail)."""
    from longctx.model.hf import pin_rope_length
    from longctx.parallel.sequence.documents import Documents

    shard = torch.tensor([[4, 5, 6, 7, 24, 25, 26, 27]])
    packed = Documents.from_ids(torch.tensor([[0] * 10 + [1] * 12 + [2] * 10])).rope_positions(torch.arange(32))
    x = torch.zeros(1)
    for kind, *_ in ROPES:
        def load(path=hf_dirs[f"llama_{kind}"]):
            return transformers.AutoModelForCausalLM.from_pretrained(path)

        whole = load().model.rotary_emb(x, torch.arange(32)[None])
        pinned = load()
        pin_rope_length(pinned, 32)
        for positions in (shard, packed):
            for got, want in zip(pinned.model.rotary_emb(x, positions), whole):
                torch.testing.assert_close(got, want[:, positions[0]], rtol=0, atol=1e-6, msg=kind)
            unpinned = load().model.rotary_emb(x, positions)
            assert (unpinned[0] - whole[0][:, positions[0]]).abs().max() > 1e-3, kind


def test_packed_documents_equal_each_document_alone(hf_dirs):
    """A row packed with documents (13, 11 and 8 tokens) equals the eager model run on each document alone:
    windows, Llama 4's chunks and its position-scaled queries restart with every document, as RoPE does."""
    from tests.model._hf_workers import packed_against_alone

    for arch in ("llama4", "qwen2"):
        for layout in (dict(cp=2, strategy="zigzag"), dict(cp=2, strategy="ulysses")):
            r = run(packed_against_alone, 2, args=(hf_dirs[arch], [13, 11, 8], layout), timeout=300)[0]
            assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 * r["ref_loss"], (arch, layout, r["loss"], r["ref_loss"])
            assert max(r["grad_rel_err"].values()) <= 1e-5, (arch, layout, r["grad_rel_err"])


def test_a_layer_that_drops_the_attention_kwargs_is_refused_packed(tmp_path):
    """Nemotron's decoder layer calls its attention without the keyword arguments it was given: unpacked it is
    exact, and a packed row (whose documents could not reach the attention) is a one-line ConfigError rather than
    attention across the documents."""
    from tests.model._hf_workers import packed_through_a_layer_that_drops_kwargs

    path = _save(transformers.NemotronForCausalLM, transformers.NemotronConfig(**SMALL), tmp_path / "nemotron")
    got = run(packed_through_a_layer_that_drops_kwargs, 1, args=(path,), timeout=120)[0]
    assert got["unpacked_err"] < 1e-5, got
    assert got["packed"].startswith("ConfigError: NemotronAttention's decoder layer does not hand its attention the "
                                    "keyword arguments"), got["packed"]


def test_llama4_chunks_and_query_temperature_matter(hf_dirs):
    """Without the chunks or the true positions of its scaled queries the Llama 4 above would compute
    something else (so the comparisons above could fail)."""
    from tests.model._hf_workers import batch

    path = hf_dirs["llama4"]
    inp, _ = batch(64)

    def logits(**config):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **config)
        return model(input_ids=inp).logits

    base = logits()
    assert (logits(attention_chunk_size=1024) - base).abs().max() > 1e-3
    assert (logits(attn_temperature_tuning=False) - base).abs().max() > 1e-3


def test_sliding_windows_are_applied(hf_dirs):
    """The window changes the result (so the test above could fail if it were dropped)."""
    from tests.model._hf_workers import batch

    path = hf_dirs["mistral"]
    windowed = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    full = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", sliding_window=None)
    inp, _ = batch(64)
    assert (windowed(input_ids=inp).logits - full(input_ids=inp).logits).abs().max() > 1e-3


@pytest.mark.parametrize("head_dim", [None, 16], ids=["dim/heads", "head_dim 16"])
def test_longctx_llama_and_hf_llama_weights_round_trip(tmp_path, head_dim):
    from longctx.config import load
    from longctx.model import build_model
    from longctx.model.hf_weights import load_hf_llama, save_hf_llama

    cfg = load(overrides=["model.vocab_size=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
                          "model.ffn_dim=64", "model.rope_theta=500000.0",
                          f"model.head_dim={head_dim or 'null'}"]).model
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
        assert back_cfg.head_dim == head_dim and hf.config.head_dim == (head_dim or 8)
    # HF -> longctx, from a model transformers initialised
    torch.manual_seed(2)
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SMALL, head_dim=head_dim or 8))
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
    from longctx.model.hf import parallelize_hf
    from longctx.model.hf_checks import check_hf_dir
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
    from longctx.model.hf_checks import read_hf_config

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{bad")
    (tmp_path / "broken" / "model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="its config.json cannot be read"):
        read_hf_config(str(tmp_path / "broken"))

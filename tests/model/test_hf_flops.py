"""What a token costs per layer (model/hf_flops.py): the experts a token is routed to, latent attention's
projections, and every layer's own attention pairs (windows, chunks, per-layer widths)."""

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")

from .test_hf import DEEPSEEK, GEMMA4, LLAMA4, SMALL, SMALL_PER_LAYER  # noqa: E402


def test_a_mixture_of_experts_counts_the_experts_a_token_runs():
    # FLOPs and MFU read ffn_dim: for a mixture of experts, the width of the experts each token is routed to
    # (plus a shared expert) on its sparse layers, averaged over the layers; a dense model's own width
    from longctx.model.hf import model_config

    assert model_config(transformers.LlamaConfig(**SMALL)).ffn_dim == 64
    gpt_oss = transformers.GptOssConfig(**dict(SMALL, intermediate_size=32), head_dim=8, num_local_experts=4,
                                        num_experts_per_tok=2)
    assert model_config(gpt_oss).ffn_dim == 2 * 32
    # 4 layers, every second sparse, layer 3 dense anyway: widths 40, 2 * 16 + 24, 40, 40
    qwen_moe = transformers.Qwen2MoeConfig(**dict(SMALL, num_hidden_layers=4, intermediate_size=40),
                                           moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2,
                                           shared_expert_intermediate_size=24, decoder_sparse_step=2,
                                           mlp_only_layers=[3])
    assert model_config(qwen_moe).ffn_dim == (40 + 56 + 40 + 40) // 4
    # DeepSeek: layer 0 dense (64), then 2 routed + 1 shared expert of 16
    assert model_config(DEEPSEEK).ffn_dim == (64 + 3 * 16) // 2
    # Llama 4, every second layer sparse: dense layers intermediate_size_mlp (40) wide, sparse ones one routed
    # expert and the implicit shared one (16 each)
    llama4 = transformers.Llama4TextConfig(**dict(SMALL, num_hidden_layers=4, intermediate_size=16),
                                           intermediate_size_mlp=40, num_local_experts=4, num_experts_per_tok=1,
                                           interleave_moe_layer_step=2, head_dim=8)
    assert model_config(llama4).ffn_dim == (40 + 32 + 40 + 32) // 4
    # experts only, no dense width in the config (Solar Open): 2 routed + 1 shared of 16 on every layer
    solar = transformers.SolarOpenConfig(**{k: v for k, v in SMALL.items() if k != "intermediate_size"},
                                         moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=1,
                                         num_experts_per_tok=2)
    assert model_config(solar).ffn_dim == 3 * 16
    # Ernie 4.5: layer 0 dense (64), layer 1 two routed + one shared expert of 16 (its own key names)
    ernie = transformers.Ernie4_5_MoeConfig(**SMALL, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                                            moe_intermediate_size=16, moe_layer_start_index=1)
    assert model_config(ernie).ffn_dim == (64 + 3 * 16) // 2


def _brute_pairs(length: int, window=None, chunk=None) -> int:
    """Causal pairs (i, j <= i) of one sequence that a window (i - j < window) or chunks (same j // chunk)
    allow, one by one."""
    return sum(1 for i in range(length) for j in range(i + 1)
               if (window is None or i - j < window) and (chunk is None or i // chunk == j // chunk))


def test_flops_count_every_layers_own_attention():
    """FLOPs of an HF model read each layer: latent attention's low-rank projections (counted here from the
    model's own Linear layers) and its q/k and v widths; sliding windows and chunks cut the pairs; a
    heterogeneous config's per-layer head widths."""
    from longctx.model.hf import model_config
    from longctx.model.hf_flops import attention_layers
    from longctx.train.metrics import layer_attention_work, model_flops_per_step

    layers = attention_layers(DEEPSEEK)
    model = transformers.DeepseekV3ForCausalLM(DEEPSEEK)
    linear = sum(m.weight.numel() for m in model.model.layers[0].self_attn.modules() if isinstance(m, torch.nn.Linear))
    assert layers == [{"qk_dim": 12, "v_dim": 6, "params": linear, "kv_heads": 4, "window": None, "chunk": None}] * 2
    cfg = model_config(DEEPSEEK)
    assert cfg.head_dim == 12
    flops = model_flops_per_step(cfg, seq_len=8, sequences=1, layers=layers)
    assert flops["attention"] == 6 * 2 * 4 * (12 + 6) * _brute_pairs(8)
    assert flops["dense"] == 6 * 8 * (2 * (linear + 3 * 32 * cfg.ffn_dim) + 32 * 64)
    # Llama 4: a chunked layer (chunks of 8) and a full one; Gemma 3: a sliding layer (window 5) and a full
    # one; Gemma 4: heads 8 and 16 wide; packed rows restart every count per document
    gemma3 = transformers.Gemma3TextConfig(**SMALL, head_dim=16, sliding_window=5,
                                           layer_types=["sliding_attention", "full_attention"])
    for config, pairs in ((LLAMA4, lambda n: [_brute_pairs(n, chunk=8), _brute_pairs(n)]),
                          (gemma3, lambda n: [_brute_pairs(n, window=5), _brute_pairs(n)]),
                          (GEMMA4, lambda n: [_brute_pairs(n, window=5), _brute_pairs(n)])):
        layers = attention_layers(config)
        widths = [2 * layer["qk_dim"] for layer in layers]
        for lengths in ([20], [13, 11, 8]):
            want = sum(4 * w * sum(pairs(n)[i] for n in lengths) for i, w in enumerate(widths))
            assert layer_attention_work(layers, 4, lengths) == want, (type(config).__name__, lengths)
    assert [layer["qk_dim"] for layer in attention_layers(GEMMA4)] == [8, 16] and model_config(GEMMA4).head_dim == 16
    # Gemma 4's full layers with values that are their keys (attention_k_eq_v) and K/V heads of their own: per
    # layer K/V heads, no v_proj, each layer's parameters those of its own Linear layers
    k_eq_v = transformers.Gemma4TextConfig(**dict(SMALL, num_key_value_heads=2), **SMALL_PER_LAYER, head_dim=8,
                                           global_head_dim=16,
                                           sliding_window=5, layer_types=["sliding_attention", "full_attention"],
                                           attention_k_eq_v=True, num_global_key_value_heads=1)
    layers, model = attention_layers(k_eq_v), transformers.Gemma4ForCausalLM(k_eq_v)
    assert [layer["kv_heads"] for layer in layers] == [2, 1] and model_config(k_eq_v).n_kv_heads == 2
    for layer, decoder_layer in zip(layers, model.model.layers):
        linear = sum(m.weight.numel() for m in decoder_layer.self_attn.modules() if isinstance(m, torch.nn.Linear))
        assert layer["params"] == linear

"""Activation memory, counted (bytes of tensors saved for backward, parameters excluded), not timed."""

from longctx.launch import run

from ._workers import config, saved_bytes

MEM = ["model.dim=64", "model.ffn_dim=128", "train.seq_len=2048", "train.batch_size=1", "train.loss_chunk=256",
       "data.task=induction"]


def test_cp4_saves_under_a_third_of_cp1_per_rank():
    single = run(saved_bytes, 1, args=(config(*MEM),), timeout=120)[0]
    per_rank = run(saved_bytes, 4, args=(config(*MEM, "parallel.cp=4", "parallel.strategy=zigzag"),), timeout=120)
    assert single > 0
    ratios = [b / single for b in per_rank]
    assert max(ratios) <= 0.3, ratios
    # and the split is even: zigzag gives every rank the same number of tokens
    assert max(per_rank) == min(per_rank), per_rank


def test_activation_checkpointing_and_chunked_mlp_save_less():
    base = run(saved_bytes, 1, args=(config(*MEM),), timeout=120)[0]
    full_ac = run(saved_bytes, 1, args=(config(*MEM, "parallel.activation_checkpoint=full"),), timeout=120)[0]
    mlp = run(saved_bytes, 1, args=(config(*MEM, "train.mlp_chunks=4"),), timeout=120)[0]
    assert full_ac < 0.5 * base, (full_ac, base)
    assert mlp < base, (mlp, base)
    # the launch check's floor (one saved residual per layer) is below what full checkpointing saves
    from longctx.config import from_dict
    from longctx.train.machine import memory_lower_bound
    from longctx.train.setup import dims_from_config

    cfg = from_dict(config(*MEM, "parallel.activation_checkpoint=full"))
    _, residuals = memory_lower_bound(cfg, dims_from_config(cfg, 1))
    assert 0 < residuals <= full_ac, (residuals, full_ac)


def test_memory_floor_by_hand():
    from longctx.config import from_dict
    from longctx.train.machine import memory_lower_bound
    from longctx.train.setup import dims_from_config

    cfg = from_dict(config("model.n_layers=4", "model.dim=64", "train.seq_len=1024", "train.batch_size=8",
                           "train.accumulation=2", "parallel.dp_shard=2", "parallel.cp=2", "parallel.pp=2",
                           "parallel.microbatches=2"))
    # 8 sequences over dp 2: 4 per rank, ids + labels int64; a pipeline microbatch is 4 / 2 / 2 = 1 sequence,
    # 1024 / cp 2 = 512 tokens, 2 layers per stage, 64 floats each
    assert memory_lower_bound(cfg, dims_from_config(cfg, 8)) == (4 * 1024 * 8 * 2, 2 * 512 * 64 * 4)


def test_evaluation_memory_floor_by_hand(monkeypatch):
    import pytest

    from longctx.config import ConfigError, from_dict
    from longctx.train import machine

    model = from_dict(config("model.n_layers=4", "model.dim=64", "model.n_heads=4", "model.n_kv_heads=2",
                             "model.ffn_dim=96")).model
    monkeypatch.setattr(machine, "_rank_memory", lambda local_ranks: (800_000, "a test's 800 kB"))
    # 2 rows x 1000 tokens over 4 context ranks: 500 tokens a rank, each holding fp32 K and V of 4 layers (2 heads
    # of 16) and, while the prompt is prefilled, one layer's residual (64), queries (4 x 16), gate and up (2 x 96)
    per_token = (4 * 2 * 2 * 16 + 64 + 4 * 16 + 2 * 96) * 4
    assert 500 * per_token > 800_000 > 250 * per_token
    machine.check_eval_memory(model, rows=2, tokens=1000, ranks=8, what="x")  # half the tokens a rank: fits
    with pytest.raises(ConfigError, match=r"--lengths 1000 needs at least 0.0 GiB on each rank \(the K/V cache of "
                                          r"every layer and one layer's activations\)"):
        machine.check_eval_memory(model, rows=2, tokens=1000, ranks=4, what="--lengths 1000")
    # perplexity: the fp32 logits of 250 tokens a rank, vocabulary 256 (256 kB)
    machine.check_eval_memory(model, rows=2, tokens=1000, ranks=8, logits=True, what="x")
    with pytest.raises(ConfigError, match=r"\(the fp32 logits of its shard\)"):
        machine.check_eval_memory(model, rows=2, tokens=2000, ranks=1, logits=True, what="x")


def test_evaluation_memory_floor_of_latent_attention(monkeypatch, tmp_path):
    """DeepSeek-style latent attention caches 12-wide keys and 6-wide values per head, not 2 x 12."""
    import pytest

    transformers = pytest.importorskip("transformers")
    from longctx.config import ConfigError
    from longctx.model.hf import model_config
    from longctx.train import machine

    hf = transformers.DeepseekV3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=8,
                                       qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=6, n_routed_experts=4,
                                       num_experts_per_tok=2, n_group=1, topk_group=1)
    hf.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")  # the directory check wants weights; none are read
    model = model_config(hf)
    model.hf_path = str(tmp_path)
    kv = 2 * 500 * 2 * 4 * (12 + 6) * 4  # 2 rows of 500 tokens a rank, 2 layers, 4 heads, fp32
    live = 2 * 500 * (32 + 4 * 12) * 4  # and one layer's residual and queries (experts may run one at a time)
    monkeypatch.setattr(machine, "_rank_memory", lambda local_ranks: (kv + live, "exactly the cache and more"))
    machine.check_eval_memory(model, rows=2, tokens=1000, ranks=2, what="x")  # 2 x 12 wide would not fit
    with pytest.raises(ConfigError, match="the K/V cache"):
        machine.check_eval_memory(model, rows=2, tokens=1002, ranks=2, what="x")


def test_a_named_kernel_is_asked_about_every_call_shape_up_front(monkeypatch):
    """What a named backend would refuse at its first attention call (on every rank, mid-step) is one line before
    anything is built: flash-attn's own support rules asked of the job's calls on a GPU (a dtype, document masks),
    and triton's head width; the calls it takes pass."""
    import longctx.kernels.flash_backend  # noqa: F401 - registers flash (unavailable here; its rules are plain code)
    import longctx.parallel.dims as dims_module
    from longctx.config import load
    from longctx.kernels import backends
    from longctx.train import validate_job
    from longctx.train.machine import kernel_problem

    monkeypatch.setattr(dims_module, "device_type_from_env", lambda: "cuda")
    flash, triton = backends()["flash"], backends()["triton"]

    def problem(backend, *overrides, world=1):
        cfg = load(path="configs/tiny.yaml", overrides=["parallel.dp_shard=1", *overrides])
        return kernel_problem(cfg, validate_job(cfg, world), backend)

    for strategy in ("ring", "zigzag", "striped", "allgather"):
        assert problem(flash, "parallel.cp=2", f"parallel.strategy={strategy}", "model.window=40", world=2) is None
    assert problem(flash, "train.precision=fp32") == "flash-attn takes fp16/bf16, got torch.float32"
    assert "document masks" in problem(flash, "data.source=passkey", "data.pack_min=40", "train.seq_len=256",
                                       "parallel.cp=2", world=2)
    assert "head_dim 264 is not supported" in problem(triton, "model.head_dim=264")
    # (a width it takes: whatever else it says here, where the kernel tests may have loaded it interpreted)
    assert "head_dim" not in (problem(triton, "model.head_dim=64") or "")

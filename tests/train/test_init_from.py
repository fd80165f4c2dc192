"""train.init_from: a new stage starts from another run's weights (any layout or engine wrote them) with a
fresh optimizer, schedule and step: its starting weights are the checkpoint's bit for bit, and the stage
trains alike on every layout (1e-5 against one process); train.resume=auto continues the stage itself."""

import os
import re

import pytest
import torch

from longctx.config import ConfigError, load
from longctx.launch import run
from longctx.launch.local import RankError
from longctx.train import validate_job, weights

from ._workers import config, resume_errors, train_and_collect, train_and_print

CP2 = ["parallel.cp=2", "parallel.dp_shard=1"]
# the next stage: twice the context, another RoPE base (shapes unchanged)
LONGER = ["train.seq_len=128", "model.rope_theta=40000", "train.steps=2"]


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_a_stage_starts_from_the_weights_on_any_layout(tmp_path):
    short = str(tmp_path / "short")
    ds_short = str(tmp_path / "ds_short")
    run(train_and_collect, 2, args=([config(*CP2, "train.steps=3", "checkpoint.interval=3", run_dir=short),
                                     config("parallel.engine=deepspeed", "parallel.zero_stage=1", *CP2,
                                            "train.steps=2", "checkpoint.interval=2", run_dir=ds_short)],),
        timeout=300)
    root, ds_root = os.path.join(short, "checkpoints"), os.path.join(ds_short, "checkpoints")
    start = weights.export(root, str(tmp_path / "start.pt"))
    ds_start = weights.export(ds_root, str(tmp_path / "ds_start.pt"))
    stage = [*LONGER, f"train.init_from={root}"]
    one = run(train_and_collect, 1, args=([config(*stage, run_dir=str(tmp_path / "at0")),
                                           config(*stage, run_dir=str(tmp_path / "one")),
                                           config(*LONGER, f"train.init_from={ds_root}",
                                                  run_dir=str(tmp_path / "from_ds"))], [0, None, 0]), timeout=300)[0]
    assert _same(one[0]["params"], start) and one[0]["initialized_from"].endswith("step_00000003")
    assert _same(one[2]["params"], ds_start)  # DeepSpeed's full weights, into the torch engines
    ref = one[1]
    assert ref["steps"] == [1, 2] and ref["resumed_from"] is None
    layouts = [["parallel.tp=2", *CP2], ["parallel.pp=2", *CP2], ["parallel.dp_shard=2", "parallel.cp=2"],
               ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.dp_shard=2", "parallel.cp=2"]]
    got = run(train_and_collect, 4, args=([config(*stage, *lay, run_dir=str(tmp_path / f"l{i}"))
                                           for i, lay in enumerate(layouts)],), timeout=300)[0]
    for lay, r in zip(layouts, got):
        assert r["initialized_from"].endswith("step_00000003") and r["steps"] == [1, 2], lay
        for a, b in zip(r["losses"], ref["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (lay, a, b)
        worst = max((r["params"][k] - ref["params"][k]).abs().max().item() for k in ref["params"])
        assert worst <= 1e-5, (lay, worst)


def test_an_interrupted_stage_resumes_itself_and_shapes_must_match(tmp_path):
    short = str(tmp_path / "short")
    run(train_and_collect, 1, args=([config("train.steps=1", "checkpoint.interval=1", run_dir=short)],),
        timeout=300)
    root = os.path.join(short, "checkpoints")
    stage = str(tmp_path / "stage")
    both = [*LONGER, f"train.init_from={root}", "train.resume=auto", "checkpoint.interval=1"]
    first, again = run(train_and_collect, 1, args=([config(*both, run_dir=stage), config(*both, run_dir=stage)],
                                                    [1, None]), timeout=300)[0]
    assert first["initialized_from"].endswith("short/checkpoints/step_00000001") and first["steps"] == [1]
    assert again["resumed_from"].endswith("stage/checkpoints/step_00000001") and again["initialized_from"] is None
    assert again["steps"] == [2]
    errors = run(resume_errors, 1, args=([config(*LONGER, "model.ffn_dim=96", f"train.init_from={root}",
                                                 run_dir=str(tmp_path / "wide")),
                                          config(*LONGER, "model.n_heads=2", "model.n_kv_heads=1",
                                                 f"train.init_from={root}", run_dir=str(tmp_path / "heads")),
                                          config(*LONGER, "model.n_layers=1", f"train.init_from={root}",
                                                 run_dir=str(tmp_path / "shallow")),
                                          config(*LONGER, "model.dim=64", f"train.init_from={root}",
                                                 run_dir=str(tmp_path / "wider"))],),
                 timeout=300)[0]
    assert "does not fit this model" in errors[0] and "it was written with model.ffn_dim=64 (this run: 96)" in \
        errors[0] and "train.init_from takes a checkpoint of a model with the same shapes" in errors[0], errors
    # the same weight shapes split into other heads (4 x 8 as 2 x 16) would load and compute another function
    assert "does not fit this model: it has model.n_heads=4 (this run: 2), model.n_kv_heads=2 (this run: 1), " \
           "model.head_dim=8 (this run: 16), the same weight shapes split into other heads" in errors[1], errors
    # every weight the shallower model has fits, and the checkpoint's second layer would be dropped
    assert re.search(r"does not fit this model: it holds layers\.1\.\S+, .* which this model has no place for \(it "
                     r"was written with model\.n_layers=2 \(this run: 1\)", errors[2]), errors
    # a wider model also has wider heads (dim / n_heads), but its shapes differ: the width is named, not the heads
    assert "it was written with model.dim=32 (this run: 64)" in errors[3] and "split into other heads" not in \
        errors[3], errors
    with pytest.raises(ConfigError, match=r"train.init_from='/nonexistent' does not exist; give a checkpoint"):
        validate_job(load(overrides=["train.init_from=/nonexistent"]), 1)
    with pytest.raises(RankError, match=r"train.init_from=.* holds no complete checkpoint"):
        run(train_and_collect, 1, args=([config(f"train.init_from={tmp_path}", run_dir=str(tmp_path / "e"))],),
            timeout=300)


def test_a_hugging_face_llama_starts_the_native_model(tmp_path):
    """A Llama 3 style HF directory (llama3 RoPE, tied embeddings, stored in bf16) starts the native model at
    its weights bit for bit (each rank reading its slices of the safetensors), and the stage trains alike
    under tp, pp and DeepSpeed (1e-5); its shapes must be this run's."""
    transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")
    from longctx.model.hf_weights import load_hf_llama

    rope = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16}
    hf_dir = str(tmp_path / "llama")
    torch.manual_seed(3)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True, rope_parameters=rope)).to(torch.bfloat16).save_pretrained(
        hf_dir)
    want = load_hf_llama(hf_dir)[0].state_dict()
    stage = [*LONGER, "model.rope_theta=500000", "model.rope_scaling.type=llama3", "model.rope_scaling.factor=8",
             "model.rope_scaling.original_max_positions=16", "model.norm_eps=1e-6", f"train.init_from={hf_dir}"]
    one = run(train_and_collect, 1, args=([config(*stage, run_dir=str(tmp_path / "at0")),
                                           config(*stage, run_dir=str(tmp_path / "one"))], [0, None]),
              timeout=300)[0]
    assert _same(one[0]["params"], want) and one[0]["initialized_from"] == hf_dir
    # the same weights under the schema's RoPE (rope settings left out): allowed, as context extension is, but said
    plain = [*LONGER, "train.steps=1", "model.norm_eps=1e-6", f"train.init_from={hf_dir}"]
    (_, said), = run(train_and_print, 1, args=(config(*plain, run_dir=str(tmp_path / "plain")),), timeout=300)
    assert f"longctx: note: train.init_from='{hf_dir}' was trained with RoPE {{'rope_theta': 500000.0, " \
           "'rope_scaling': {'type': 'llama3', 'factor': 8.0," in said and "this stage computes with {'rope_theta': " \
           "40000.0}; that is a context-extension stage's choice, else set model.rope_theta=500000, " \
           "model.rope_scaling.type=llama3, model.rope_scaling.factor=8.0, " in said, said
    (_, said), = run(train_and_print, 1, args=(config(*stage, "train.steps=1", run_dir=str(tmp_path / "kept")),),
                     timeout=300)
    assert "note:" not in said, said
    layouts = [["parallel.tp=2", *CP2], ["parallel.pp=2", *CP2],
               ["parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.dp_shard=2", "parallel.cp=2"]]
    got = run(train_and_collect, 4, args=([config(*stage, *lay, run_dir=str(tmp_path / f"l{i}"))
                                           for i, lay in enumerate(layouts)],), timeout=300)[0]
    for lay, r in zip(layouts, got):
        for a, b in zip(r["losses"], one[1]["losses"]):
            assert abs(a - b) <= 1e-5 * abs(b), (lay, a, b)
        worst = max((r["params"][k] - one[1]["params"][k]).abs().max().item() for k in want)
        assert worst <= 1e-5, (lay, worst)
    errors = run(resume_errors, 1, args=([config(*stage, "model.ffn_dim=96", run_dir=str(tmp_path / "wide")),
                                          config(*stage, "model.norm_eps=1e-5", run_dir=str(tmp_path / "eps"))],),
                 timeout=300)[0]
    assert "does not fit this model: it has model.ffn_dim=64 (this run: 96); set those" in errors[0], errors
    # no shape shows the norm's epsilon, and LlamaConfig's default (1e-6) is not the schema's (1e-5)
    assert "does not fit this model: it has model.norm_eps=1e-06 (this run: 1e-05)" in errors[1], errors

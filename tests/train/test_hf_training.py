"""`model.hf_path` in a training config: layouts train the same steps as one process; export --format hf
gives a directory transformers loads with the trained weights; bad configs are one-line errors."""

import os

import pytest
import torch

from longctx.config import ConfigError, load
from longctx.launch import run
from longctx.train import validate_job
from tests.support.cli import main
from tests.support.equivalence import compare_runs, compare_validation
from tests.support.perplexity import assert_same_ppl, ppl_by_layout

from ._workers import config, resume_errors, train_and_collect

transformers = pytest.importorskip("transformers", reason="the Hugging Face tests need the `hf` extra")


def _saved(tmp_path_factory, name: str, model_cls: str, config_cls: str, **config) -> str:
    """A tiny HF model (vocab 256, width 32, 4 heads over 2 K/V heads), seeded, saved to a directory of its own."""
    path = tmp_path_factory.mktemp(name) / name
    torch.manual_seed(0)
    sizes = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    getattr(transformers, model_cls)(getattr(transformers, config_cls)(**sizes, **config)).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return _saved(tmp_path_factory, "qwen2", "Qwen2ForCausalLM", "Qwen2Config", num_hidden_layers=2,
                  use_sliding_window=True, sliding_window=12, max_window_layers=1,
                  layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=True)


def _cfg(path, *extra, run_dir):
    # AdamW's eps at 1e-6: an element whose gradient is ~1e-8 moves by ~lr * sign(gradient) at eps=1e-8, so
    # summation-order rounding (tensor parallelism all-reduces partial sums) flipped such updates and put
    # 1.4e-5 between final weights whose losses agreed to 1e-7; at 1e-6 the worst is 1.7e-7
    return config(f"model.hf_path={path}", "train.steps=3", "train.eps=1e-6", *extra, run_dir=run_dir)


def test_hf_model_layouts_train_like_one_process(qwen_dir, tmp_path):
    val = ["validation.interval=2", "validation.batches=1"]  # the held-out loss after steps 2 and 3 too
    # one process built on the meta device: its tied head stays the embedding (to_empty alone unties it)
    ref, meta = run(train_and_collect, 1, args=([_cfg(qwen_dir, *val, run_dir=str(tmp_path / "one")),
                                                 _cfg(qwen_dir, *val, "parallel.meta_init=true",
                                                      run_dir=str(tmp_path / "meta"))],), timeout=180)[0]
    assert meta["losses"] == ref["losses"] and meta["grad_norms"] == ref["grad_norms"]
    assert all(torch.equal(meta["params"][k], v) for k, v in ref["params"].items())
    layouts = [("cp=4 zigzag", ["parallel.cp=4"]), ("dp_shard=2 x cp=2", ["parallel.dp_shard=2", "parallel.cp=2"]),
               ("cp=4 hybrid", ["parallel.cp=4", "parallel.strategy=hybrid", "parallel.ulysses=2"]),
               # tensor parallel: q/k/v/gate/up by columns, o/down by rows, the tied embedding and output
               # by vocabulary rows; with context parallelism and with FSDP2
               ("tp=2 x cp=2", ["parallel.tp=2", "parallel.cp=2", "parallel.dp_shard=1"]),
               ("tp=2 x dp_shard=2", ["parallel.tp=2", "parallel.dp_shard=2", "parallel.cp=1"]),
               # built on the meta device, split, each rank reading only its slices of the safetensors (DCP)
               ("tp=2 x dp_shard=2, meta_init", ["parallel.tp=2", "parallel.dp_shard=2", "parallel.cp=1",
                                                "parallel.meta_init=true"])]
    configs = [_cfg(qwen_dir, *o, *val, run_dir=str(tmp_path / n.replace(" ", "").replace(",", "")))
               for n, o in layouts]
    results = run(train_and_collect, 4, args=(configs,), timeout=300)[0]
    assert list(ref["validation"]) == [2, 3]
    for (name, _), got in zip(layouts, results):
        compare_runs(name, got, ref, steps=3)
        compare_validation(name, got, ref)
    whole, pieces = results[-2:]  # the same layout loaded both ways: the same run, bit for bit
    assert pieces["losses"] == whole["losses"] and pieces["grad_norms"] == whole["grad_norms"]
    assert all(torch.equal(pieces["params"][k], v) for k, v in whole["params"].items())


@pytest.mark.slow
def test_hf_model_under_deepspeed_zero3_trains_exports_and_evaluates(qwen_dir, tmp_path):
    """DeepSpeed ZeRO-3 over cp=2 (parameters partitioned, the tied head gathered where the loss reads it)
    trains the steps of one process; its checkpoint (DeepSpeed's files + model.pt) exports to a directory
    transformers loads, and evaluates as the architecture with the trained weights."""
    pytest.importorskip("deepspeed", reason="pip install 'longctx[deepspeed]' (make test installs it)")
    from longctx.eval import load_checkpoint_model
    from longctx.train import weights

    ref = run(train_and_collect, 1, args=([_cfg(qwen_dir, run_dir=str(tmp_path / "one"))],), timeout=180)[0][0]
    run_dir = tmp_path / "zero3"
    cfg = _cfg(qwen_dir, "parallel.engine=deepspeed", "parallel.zero_stage=3", "parallel.cp=2",
               "parallel.dp_shard=1", "checkpoint.interval=3", run_dir=str(run_dir))
    got = run(train_and_collect, 2, args=([cfg],), timeout=300)[0][0]
    assert got["engine"] == "deepspeed"
    compare_runs("zero3 x cp=2", got, ref, steps=3)
    root = str(run_dir / "checkpoints")
    weights.export(root, str(tmp_path / "hf"), fmt="hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert exported.lm_head.weight.data_ptr() == exported.model.embed_tokens.weight.data_ptr()  # still tied
    for name, value in exported.state_dict().items():
        assert torch.equal(value, got["params"]["hf." + name]), name
    model, _ = load_checkpoint_model(root, log=lambda *a, **k: None)
    assert model.state_dict().keys() == got["params"].keys()
    for name, value in model.state_dict().items():
        assert torch.equal(value, got["params"][name]), name
    # a new stage from its full weights, which list the tied head under both names (it was refused)
    (start,) = run(train_and_collect, 1, args=([_cfg(qwen_dir, f"train.init_from={root}",
                                                     run_dir=str(tmp_path / "next"))], 0), timeout=180)[0]
    assert all(torch.equal(start["params"][k], v) for k, v in got["params"].items())


def test_init_from_reads_a_tied_head_once_and_refuses_an_untied_one(qwen_dir, tmp_path, tmp_path_factory):
    """A tied model's checkpoint lists the head under its own name too: it starts a new stage (it was refused as
    a weight with no place); an untied model's head, a tensor of its own, is refused by name, not loaded over
    the embedding (DCP checkpoints here; DeepSpeed's full weights in the ZeRO-3 test)."""
    untied = _saved(tmp_path_factory, "qwen2_untied", "Qwen2ForCausalLM", "Qwen2Config", num_hidden_layers=2,
                    tie_word_embeddings=False)
    tied_run, untied_run = str(tmp_path / "tied"), str(tmp_path / "untied")
    run(train_and_collect, 1, args=([_cfg(qwen_dir, "train.steps=1", "checkpoint.interval=1", run_dir=tied_run),
                                     _cfg(untied, "train.steps=1", "checkpoint.interval=1", run_dir=untied_run)],),
        timeout=180)
    tied_root, untied_root = os.path.join(tied_run, "checkpoints"), os.path.join(untied_run, "checkpoints")
    (start,) = run(train_and_collect, 1, args=([_cfg(qwen_dir, f"train.init_from={tied_root}",
                                                     run_dir=str(tmp_path / "again"))], 0), timeout=180)[0]
    from longctx.train import weights

    saved = weights.export(tied_root, str(tmp_path / "tied.pt"))
    assert set(start["params"]) == set(saved) and all(torch.equal(start["params"][k], saved[k]) for k in saved)
    (error,) = run(resume_errors, 1, args=([_cfg(qwen_dir, f"train.init_from={untied_root}",
                                                 run_dir=str(tmp_path / "mixed"))],), timeout=180)[0]
    assert "does not fit this model: it holds hf.model.embed_tokens.weight and hf.lm_head.weight as different " \
           "tensors (an untied output head), which this model ties" in error, error


def test_a_changed_config_json_is_refused_where_the_checkpoint_is_read(qwen_dir, tmp_path):
    """Windows and RoPE live in the HF model's config.json, not in any weight shape: a resume, an evaluation
    and an export compare it with the copy the checkpoint keeps (they read the edited one silently)."""
    import json
    import shutil

    from longctx.eval import load_checkpoint_model
    from longctx.train import weights

    model = str(tmp_path / "model")
    shutil.copytree(qwen_dir, model)
    run_dir = str(tmp_path / "run")
    run(train_and_collect, 1, args=([_cfg(model, "train.steps=1", "checkpoint.interval=1", run_dir=run_dir)],),
        timeout=180)
    step = os.path.join(run_dir, "checkpoints", "step_00000001")
    assert json.load(open(os.path.join(step, "hf_config.json"))) == json.load(open(os.path.join(model, "config.json")))
    config = json.load(open(os.path.join(model, "config.json")))
    config["sliding_window"] = 24
    json.dump(config, open(os.path.join(model, "config.json"), "w"))
    (error,) = run(resume_errors, 1, args=([_cfg(model, "train.resume=auto", run_dir=run_dir)],), timeout=180)[0]
    said = rf"model.hf_path='{model}': its config.json is not the one checkpoint {step} was written with " \
           r"\(sliding_window=12 \(now 24\)\), and computes another function with these weights; "
    import re

    assert re.search(said + r"restore it to resume, or start a new stage .*train.init_from=", error), error
    with pytest.raises(ConfigError, match=said + r"restore the one it was trained with \(the checkpoint's copy is "):
        load_checkpoint_model(step, log=lambda *a, **k: None)
    with pytest.raises(ConfigError, match=said):
        weights.export(step, str(tmp_path / "hf"), fmt="hf")
    config["sliding_window"] = 12
    config["transformers_version"] = "9.9.9"  # bookkeeping, not the function
    json.dump(config, open(os.path.join(model, "config.json"), "w"))
    assert run(resume_errors, 1, args=([_cfg(model, "train.resume=auto", run_dir=run_dir)],), timeout=180)[0] == \
        ["no error"]


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory):
    """Untied (a pipeline splits the embedding from the head), four layers: per-layer sliding and full
    attention with their own RoPE tables, looked up by layer index, so a stage must keep its layers' indices."""
    return _saved(tmp_path_factory, "gemma3", "Gemma3ForCausalLM", "Gemma3TextConfig", num_hidden_layers=4,
                  head_dim=16, sliding_window=12, query_pre_attn_scalar=8, tie_word_embeddings=False,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"])


@pytest.fixture(scope="module")
def capped_dir(tmp_path_factory):
    """Gemma 2: attention scores and output logits soft-capped, weights large enough (initializer_range 0.1)
    that both caps bend them."""
    return _saved(tmp_path_factory, "gemma2", "Gemma2ForCausalLM", "Gemma2Config", num_hidden_layers=2,
                  head_dim=16, sliding_window=12, query_pre_attn_scalar=8, initializer_range=0.1,
                  attn_logit_softcapping=1.0, final_logit_softcapping=2.0,
                  layer_types=["sliding_attention", "full_attention"])


def test_hf_model_pipeline_stages_train_like_one_process(gemma_dir, capped_dir, tmp_path):
    """An HF model cut into pipeline stages (with cp, tp, FSDP2, four interleaved stages read piece by piece
    from the safetensors) trains the steps of one process, validates like it, and its checkpoint exports
    to a directory transformers loads with the trained weights and evaluates with them. In the same
    launches, a soft-capped Gemma 2 trains like one process under cp=4 (the capped scores in the ring, the
    capped logits in the chunked loss) and pp=2 x tp=2 (the last stage's vocabulary-parallel loss capped)."""
    from longctx.eval import load_checkpoint_model
    from longctx.train import weights

    val = ["validation.interval=3", "validation.batches=1"]
    ref, capped_ref = run(train_and_collect, 1, args=([_cfg(gemma_dir, *val, run_dir=str(tmp_path / "one")),
                                                        _cfg(capped_dir, *val, run_dir=str(tmp_path / "c1"))],),
                          timeout=180)[0]
    layouts = [("pp=2 x cp=2", ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1"]),
               ("pp=2 x tp=2", ["parallel.pp=2", "parallel.tp=2", "parallel.cp=1", "parallel.dp_shard=1",
                                "checkpoint.interval=3"]),
               ("pp=2 x dp_shard=2, interleaved, meta_init",
                ["parallel.pp=2", "parallel.dp_shard=2", "parallel.cp=1", "parallel.pp_schedule=interleaved_1f1b",
                 "parallel.microbatches=2", "parallel.meta_init=true"])]
    capped = [("gemma2 cp=4", ["parallel.cp=4"]),
              ("gemma2 pp=2 x tp=2", ["parallel.pp=2", "parallel.tp=2", "parallel.cp=1", "parallel.dp_shard=1"])]
    configs = [_cfg(gemma_dir, *o, *val, run_dir=str(tmp_path / f"l{i}")) for i, (_, o) in enumerate(layouts)]
    configs += [_cfg(capped_dir, *o, *val, run_dir=str(tmp_path / f"c{i + 2}")) for i, (_, o) in enumerate(capped)]
    results = run(train_and_collect, 4, args=(configs,), timeout=300)[0]
    for (name, _), got in zip(layouts + capped, results):
        want = capped_ref if name.startswith("gemma2") else ref
        compare_runs(name, got, want, steps=3)
        compare_validation(name, got, want)
    trained = results[1]["params"]
    root = str(tmp_path / "l1" / "checkpoints")
    weights.export(root, str(tmp_path / "hf"), fmt="hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert not exported.config.tie_word_embeddings and len(exported.model.layers) == 4
    for name, value in exported.state_dict().items():
        assert torch.equal(value, trained["hf." + name]), name
    model, _ = load_checkpoint_model(root, log=lambda *a, **k: None)
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(value, trained[name]) for name, value in model.state_dict().items())


def test_export_hf_of_a_trained_hf_model(qwen_dir, tmp_path):
    """The export is the trained model in its own architecture, with the source's generation settings (the eos ids
    generation stops at), never written over a directory that holds something."""
    import json
    import shutil

    source = str(tmp_path / "source")
    shutil.copytree(qwen_dir, source)
    generation = {"eos_token_id": [7, 9], "temperature": 0.7, "top_p": 0.8, "do_sample": True}
    with open(os.path.join(source, "generation_config.json"), "w") as f:
        json.dump(generation, f)
    run_dir = tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", f"model.hf_path={source}", "parallel.cp=1", "train.seq_len=64",
                 "train.batch_size=2", "train.steps=2", "checkpoint.interval=2", "logging.quiet=true",
                 "logging.tensorboard=false", f"run_dir={run_dir}"]) == 0
    out = tmp_path / "exported"
    assert main(["checkpoint", "export", str(run_dir / "checkpoints"), str(out), "--format", "hf"]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    original = transformers.AutoModelForCausalLM.from_pretrained(source)
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.config.sliding_window == 12
    with open(out / "generation_config.json") as f:
        exported = json.load(f)
    assert {k: exported.get(k) for k in generation} == generation  # the model's own, not save_pretrained's defaults
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, dict(original.named_parameters())[n])]
    assert moved  # the exported weights are the trained ones, not the checkpoint directory's
    # never over a directory that holds something: the model the run started from, an earlier export
    before = {f: os.path.getmtime(os.path.join(source, f)) for f in os.listdir(source)}
    for target in (source, out):
        assert main(["checkpoint", "export", str(run_dir / "checkpoints"), str(target), "--format", "hf"]) == 2
    assert before == {f: os.path.getmtime(os.path.join(source, f)) for f in os.listdir(source)}


def test_hf_path_errors_are_one_line(tmp_path, qwen_dir, tmp_path_factory):
    with pytest.raises(ConfigError, match="no config.json"):
        validate_job(load(overrides=[f"model.hf_path={tmp_path}"]), 1)
    # what only the built model shows, and what its config asks of attention, refused before any rank starts
    stablelm = _saved(tmp_path_factory, "stablelm", "StableLmForCausalLM", "StableLmConfig", num_hidden_layers=1)
    with pytest.raises(ConfigError, match=r"StableLmForCausalLM does not route its attention through transformers' "
                                          r"AttentionInterface"):
        validate_job(load(overrides=[f"model.hf_path={stablelm}"]), 1)
    dropout = _saved(tmp_path_factory, "dropout", "Qwen2ForCausalLM", "Qwen2Config", num_hidden_layers=1,
                     attention_dropout=0.1)
    with pytest.raises(ConfigError, match=r"Qwen2ForCausalLM has attention_dropout=0.1 \(config.json\): longctx's "
                                          r"attention applies no dropout; set attention_dropout to 0"):
        validate_job(load(overrides=[f"model.hf_path={dropout}"]), 1)
    # the model computes with its config.json's RoPE base and norm epsilon: another value would be ignored
    for key, value, theirs in [("rope_theta", "1000000", "rope_theta of its config.json \\(10000\\)"),
                               ("norm_eps", "0.001", "rms_norm_eps of its config.json \\(1e-06\\)")]:
        with pytest.raises(ConfigError, match=rf"model.{key}={value}(\.0)? with model.hf_path: a Hugging Face model "
                                              rf"computes with the {theirs}; set it there .*or drop model.{key}"):
            validate_job(load(overrides=[f"model.hf_path={qwen_dir}", f"model.{key}={value}"]), 1)
    validate_job(load(overrides=[f"model.hf_path={qwen_dir}", "model.norm_eps=1e-6"]), 1)  # its own value: fine
    validate_job(load(overrides=[f"model.hf_path={qwen_dir}", "parallel.pp=2", "parallel.dp_shard=1"]), 2)  # tied: fine
    with pytest.raises(ConfigError, match="meta_init=true with model.hf_path and parallel.engine=deepspeed is not"):
        validate_job(load(overrides=[f"model.hf_path={qwen_dir}", "parallel.engine=deepspeed", "parallel.zero_stage=3",
                                     "parallel.meta_init=true"]), 1)
    with pytest.raises(ConfigError, match=r"the model's 2 K/V heads \(model.hf_path\) do not split evenly over "
                       r"parallel.tp=4: sharing one K/V head across tp ranks is longctx's own Llama's, not a "
                       r"Hugging Face model's; use a tp that divides 2"):
        validate_job(load(overrides=[f"model.hf_path={qwen_dir}", "parallel.tp=4", "parallel.dp_shard=1"]), 4)
    with pytest.raises(ConfigError, match="ulysses"):  # 4 heads over 3 Ulysses ranks
        validate_job(load(overrides=[f"model.hf_path={qwen_dir}", "parallel.cp=3", "parallel.strategy=ulysses",
                                     "train.seq_len=96", "parallel.dp_shard=1"]), 3)
    cfg = load(overrides=[f"model.hf_path={qwen_dir}"])
    validate_job(cfg, 1)
    assert (cfg.model.dim, cfg.model.n_layers, cfg.model.vocab_size) == (32, 2, 256)  # sizes from config.json
    assert cfg.model.head_dim is None  # hidden / heads: nothing to record
    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**small)).save_pretrained(tmp_path / "qwen3")
    cfg = load(overrides=[f"model.hf_path={tmp_path / 'qwen3'}"])
    validate_job(cfg, 1)
    assert cfg.model.head_dim == 16  # wider than hidden / heads: FLOPs and checks use the real width
    # Granite multiplies its input embeddings inside the decoder's forward: every later stage would again
    transformers.GraniteForCausalLM(transformers.GraniteConfig(**small, embedding_multiplier=4.0, logits_scaling=1.0,
                                                               tie_word_embeddings=False)).save_pretrained(
        tmp_path / "granite")
    validate_job(load(overrides=[f"model.hf_path={tmp_path / 'granite'}"]), 1)
    # config.json ties the head, the files hold one of its own (edited by hand): transformers unties it, a model
    # built from the config (meta_init, evaluation) kept it tied and dropped the stored head
    import json
    import shutil

    shutil.copytree(tmp_path / "granite", tmp_path / "retied")
    hf_config = json.loads((tmp_path / "retied" / "config.json").read_text())
    (tmp_path / "retied" / "config.json").write_text(json.dumps(dict(hf_config, tie_word_embeddings=True)))
    with pytest.raises(ConfigError, match=r"its config.json ties lm_head.weight to model.embed_tokens.weight "
                                          r"\(tie_word_embeddings\), but its safetensors hold it with values of its "
                                          r"own.*set \"tie_word_embeddings\": false"):
        validate_job(load(overrides=[f"model.hf_path={tmp_path / 'retied'}"]), 1)
    shutil.copytree(tmp_path / "retied", tmp_path / "cut")  # a tied model's files cut short: one line, no traceback
    stored = tmp_path / "cut" / "model.safetensors"
    stored.write_bytes(stored.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=r"cut: its safetensors cannot be read \(SafetensorError: .*save the model "
                                          r"again with save_pretrained"):
        validate_job(load(overrides=[f"model.hf_path={tmp_path / 'cut'}"]), 1)
    with pytest.raises(ConfigError, match="GraniteModel rescales its input embeddings .* set parallel.pp=1"):
        validate_job(load(overrides=[f"model.hf_path={tmp_path / 'granite'}", "parallel.pp=2", "parallel.dp_shard=1"]),
                     2)
    transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**small)).save_pretrained(tmp_path / "gemma2")
    validate_job(load(overrides=[f"model.hf_path={tmp_path / 'gemma2'}"]), 1)  # soft-capped: auto picks a backend
    with pytest.raises(ConfigError, match=r"parallel.kernel=sdpa does not compute logit soft-capping, which this "
                                          r"model's attention asks for \(attn_logit_softcapping=50.0\); use "
                                          r"parallel.kernel=auto or one of .*reference"):
        validate_job(load(overrides=[f"model.hf_path={tmp_path / 'gemma2'}", "parallel.kernel=sdpa"]), 1)
    transformers.GraniteForCausalLM(transformers.GraniteConfig(**small, logits_scaling=0.0)).save_pretrained(
        tmp_path / "granite0")
    with pytest.raises(ConfigError, match="GraniteForCausalLM has logits_scaling=0.0: the output logits would not"):
        validate_job(load(overrides=[f"model.hf_path={tmp_path / 'granite0'}"]), 1)
    # a layer tp cannot place (a mixture of experts) is found inside the ranks: still one line, exit 2
    transformers.MixtralForCausalLM(transformers.MixtralConfig(**small, num_local_experts=2)).save_pretrained(
        tmp_path / "mixtral")
    assert main(["launch", "local", "--nproc", "2", "configs/tiny.yaml", f"model.hf_path={tmp_path / 'mixtral'}",
                 "parallel.tp=2", "parallel.cp=1", "parallel.dp_shard=1", "train.seq_len=32", "train.steps=1",
                 "logging.quiet=true", f"run_dir={tmp_path / 'mixtral_run'}"]) == 2
    # RoPE whose frequencies follow each call's largest position: training pins it to train.seq_len (so any
    # cp is accepted); the library entry points refuse it over several ranks unless given a length to pin
    from longctx.model.hf import HFCausalLM, parallelize_hf
    from longctx.model.parallelize import apply_context_parallel
    from longctx.parallel import ParallelDims

    for kind, extra in (("dynamic", {"factor": 2.0}), ("longrope", {"short_factor": [1.0] * 8, "long_factor": [4.0] * 8,
                                                                   "original_max_position_embeddings": 32})):
        name = tmp_path / kind
        rope = {"rope_type": kind, "rope_theta": 10000.0, **extra}
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**small, max_position_embeddings=128,
                                                               rope_parameters=rope)).save_pretrained(name)
        validate_job(load(overrides=[f"model.hf_path={name}", "parallel.cp=2", "parallel.dp_shard=1"]), 2)
    model = transformers.AutoModelForCausalLM.from_pretrained(name)
    with pytest.raises(ValueError, match="rope_type='longrope', whose frequencies follow the largest position .* "
                                         "parallel.cp=2 context ranks.*rope_type linear, yarn or llama3"):
        parallelize_hf(model, ParallelDims(world_size=2, cp=2), mesh=object())

    class TwoRanks:  # apply_context_parallel reads the group's size through Comm.get
        world = 2

    import longctx.parallel.comm as comm

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(comm.Comm, "get", staticmethod(lambda group: TwoRanks()))
        with pytest.raises(ValueError, match="rope_type='longrope'.* the group size=2 context ranks"):
            apply_context_parallel(HFCausalLM(model), "zigzag", object())


def test_an_hf_checkpoint_evaluates_through_its_own_layers(tmp_path, capsys):
    # a Qwen3 (per-head norms, head_dim twice hidden / heads, one sliding-window layer, dynamic NTK RoPE past
    # 40 positions: pinned to the 64-token window in training and here) trained on prepared token data under
    # cp=2 loads as its architecture with the trained weights: perplexity by position at
    # cp=2 x tp=2 equals one process (its generation, what the needle grid runs, is checked token for token
    # in tests/model/test_hf_generate.py); so does tp=2 alone at a length tp does not divide (an HF model's tp
    # is not sequence-parallel: the command refused it). It evaluates with the kernel evaluation picks, not the
    # one it trained with (a run trained with flash on a GPU crashed evaluation on one cp rank: float32)
    import json

    from longctx.eval import load_checkpoint_model
    from longctx.model.hf_checks import attention_modules

    path = tmp_path / "qwen3"
    torch.manual_seed(0)
    transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=258, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, use_sliding_window=True, sliding_window=12, max_window_layers=1,
        layer_types=["full_attention", "sliding_attention"], tie_word_embeddings=True, max_position_embeddings=40,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})).save_pretrained(path)
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "abcdefghij" * (i + 3)}) + "\n" for i in range(40)))
    assert main(["data", "prepare", "--input", str(corpus), "--output", str(tmp_path / "ds"), "--quiet"]) == 0
    run_dir = tmp_path / "run"
    assert main(["launch", "local", "--nproc", "2", "configs/tiny.yaml", f"model.hf_path={path}",
                 "parallel.cp=2", "parallel.dp_shard=1", "parallel.strategy=zigzag", "parallel.kernel=reference",
                 "data.source=tokens", f"data.path={tmp_path / 'ds'}", "train.seq_len=64", "train.batch_size=2",
                 "train.steps=2", "checkpoint.interval=2", "logging.quiet=true", "logging.tensorboard=false",
                 f"run_dir={run_dir}"]) == 0
    # (4, 2): cp=2 x tp=2, the tied head split by vocabulary
    ppl = ppl_by_layout(main, str(run_dir / "checkpoints"), tmp_path, ((1, 1), (4, 2)), "--buckets", "4",
                        "--sequences", "4")
    assert_same_ppl(ppl[1, 1], ppl[4, 2])
    (tmp_path / "odd").mkdir()
    odd = ppl_by_layout(main, str(run_dir / "checkpoints"), tmp_path / "odd", ((1, 1), (2, 2)), "--buckets", "4",
                        "--sequences", "2", "--seq-len", "63")
    assert_same_ppl(odd[1, 1], odd[2, 2])
    model, _ = load_checkpoint_model(str(run_dir / "checkpoints"), log=lambda *a, **k: None)
    assert {m._longctx_cores.kernel for m in attention_modules(model.hf)} == {"auto"}
    # its model.hf_path moved away: one line before any rank starts, for perplexity as for generation
    path.rename(tmp_path / "moved")
    capsys.readouterr()
    for command in (["eval", "ppl"], ["generate", "--ids", "3"]):
        assert main([*command, "--checkpoint", str(run_dir / "checkpoints"), "--nproc", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longctx: error: model.hf_path=") and err.count("\n") == 1, err


def test_the_checkpoint_tokenizer_goes_through_the_data_pipeline(qwen_dir, tmp_path):
    import json
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    from longctx.data.prepare import prepare

    hf = tmp_path / "hf"
    shutil.copytree(qwen_dir, hf)
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "long": 2, "context": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(hf / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": "long context " * (i + 20)}) + "\n"
                                              for i in range(20)))
    prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "bytes"), progress=False)
    prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "own"), tokenizer=str(hf), progress=False)
    base = [f"model.hf_path={hf}", "data.source=tokens", "train.seq_len=64"]
    with pytest.raises(ConfigError, match="not with model.hf_path's tokenizer.json; prepare it with"):
        validate_job(load(overrides=[*base, f"data.path={tmp_path / 'bytes'}"]), 1)
    validate_job(load(overrides=[*base, f"data.path={tmp_path / 'own'}"]), 1)


def test_tensor_parallelism_shards_the_residual_stream(tmp_path):
    # sequence parallelism between the blocks: the norms' inputs and the residual stream saved for backward are
    # 1/tp of the sequence (counted bytes: without it this model saves 0.68 of one rank's bytes per tp=2 rank,
    # with it 0.56)
    from ._workers import saved_bytes

    path = tmp_path / "qwen2"
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(path)
    cfg = [f"model.hf_path={path}", "parallel.cp=1", "parallel.dp_shard=1", "train.seq_len=512",
           "train.batch_size=1"]
    one = run(saved_bytes, 1, args=(config(*cfg, run_dir=str(tmp_path / "r1")),), timeout=120)[0]
    two = run(saved_bytes, 2, args=(config(*cfg, "parallel.tp=2", run_dir=str(tmp_path / "r2")),), timeout=120)
    assert two[0] == two[1] and two[0] <= 0.6 * one, (two, one)


@pytest.fixture(scope="module")
def tied_llama_dir(tmp_path_factory):
    """Tied output head (tie_word_embeddings, one weight saved once), four layers: enough for V stages."""
    return _saved(tmp_path_factory, "llama", "LlamaForCausalLM", "LlamaConfig", num_hidden_layers=4,
                  tie_word_embeddings=True)


def test_a_tied_head_trains_in_pipeline_stages_like_one_process(tied_llama_dir, tmp_path):
    """The first stage's embedding and the last stage's copy of the tied head sum their gradients (over the
    pair of pipeline ranks, with FSDP2 or tp shards; on one rank under a V schedule) and stay equal: the
    steps of one process, whose one tied weight both copies equal; the checkpoints move between pp=2 and
    no pipeline, the head's Adam state saved once under the embedding's name."""
    head, embed = "hf.lm_head.weight", "hf.model.embed_tokens.weight"
    bf16 = ["train.precision=bf16"]  # autocast over float32 weights (no FSDP): RoPE leaves q, k in float32
    ref, ref_bf16 = run(train_and_collect, 1, args=([
        _cfg(tied_llama_dir, "checkpoint.interval=2", run_dir=str(tmp_path / "one")),
        _cfg(tied_llama_dir, *bf16, run_dir=str(tmp_path / "one_bf16"))],), timeout=180)[0]
    assert torch.equal(ref["params"][head], ref["params"][embed])
    _tied_export_counts_once(str(tmp_path / "one" / "checkpoints"), tied_llama_dir, tmp_path)
    for a, b in zip(ref_bf16["losses"], ref["losses"]):
        assert abs(a - b) <= 1e-2 * abs(b), (a, b)
    layouts = [("pp=2 x dp_shard=2", ["parallel.pp=2", "parallel.dp_shard=2", "parallel.cp=1"]),
               ("pp=2 x tp=2, meta_init", ["parallel.pp=2", "parallel.tp=2", "parallel.cp=1", "parallel.dp_shard=1",
                                           "parallel.meta_init=true", "checkpoint.interval=2"]),
               ("pp=2 x cp=2, zbv", ["parallel.pp=2", "parallel.cp=2", "parallel.dp_shard=1",
                                     "parallel.pp_schedule=zbv", "parallel.reshard_after_forward=false"])]
    configs = [_cfg(tied_llama_dir, *o, run_dir=str(tmp_path / f"l{i}")) for i, (_, o) in enumerate(layouts)]
    configs.append(_cfg(tied_llama_dir, "parallel.pp=2", "parallel.tp=2", "parallel.cp=1", "parallel.dp_shard=1",
                        *bf16, run_dir=str(tmp_path / "bf16")))
    *results, got_bf16 = run(train_and_collect, 4, args=(configs,), timeout=300)[0]
    for (name, _), got in zip(layouts, results):
        compare_runs(name, got, ref, steps=3)
        assert torch.equal(got["params"][head], got["params"][embed]), name
        assert len(got["group_timeouts"]) == 1, (name, got["group_timeouts"])  # the tied pair's groups too
    for a, b in zip(got_bf16["losses"], ref_bf16["losses"]):  # bf16 rounding differs by layout
        assert abs(a - b) <= 1e-2 * abs(b), (a, b)
    assert torch.equal(got_bf16["params"][head], got_bf16["params"][embed])
    step2 = "checkpoints/step_00000002"
    resumes = [_cfg(tied_llama_dir, "parallel.cp=2", f"train.resume={tmp_path / 'l1' / step2}",
                    run_dir=str(tmp_path / "r0")),
               _cfg(tied_llama_dir, "parallel.pp=2", "parallel.dp_shard=1", f"train.resume={tmp_path / 'one' / step2}",
                    run_dir=str(tmp_path / "r1"))]
    for name, got in zip(("pp=2 -> cp=2", "one process -> pp=2"), run(train_and_collect, 2, args=(resumes,),
                                                                      timeout=300)[0]):
        assert got["steps"] == [3], (name, got["steps"])
        assert abs(got["losses"][0] - ref["losses"][2]) <= 1e-5 * abs(ref["losses"][2]), name
        worst = max((got["params"][k] - ref["params"][k]).abs().max().item() for k in ref["params"])
        assert worst <= 1e-5 and torch.equal(got["params"][head], got["params"][embed]), (name, worst)


def _tied_export_counts_once(root, hf_dir, tmp_path):
    """The export's parameter count is the model's: the tied head, saved under both names, counts once, whether
    the tie is read from the HF directory or (that directory moved away) from the two equal tensors."""
    from longctx.train.weights import distinct_parameters, export

    state = export(root, str(tmp_path / "tied.pt"))
    expected = sum(p.numel() for p in transformers.AutoModelForCausalLM.from_pretrained(hf_dir).parameters())
    assert "hf.lm_head.weight" in state and distinct_parameters(state, root) == expected
    os.rename(hf_dir, hf_dir + ".moved")
    try:
        assert distinct_parameters(state, root) == expected
        untied = dict(state, **{"hf.lm_head.weight": state["hf.lm_head.weight"] + 1})
        assert distinct_parameters(untied, root) == expected + untied["hf.lm_head.weight"].numel()
    finally:
        os.rename(hf_dir + ".moved", hf_dir)

"""Job configs: every shipped config validates; bad input gets one clear error naming the key and the fix."""

import pathlib

import pytest
from omegaconf import OmegaConf

from longctx.config import ConfigError, load, to_yaml
from longctx.train import validate_job

ROOT = pathlib.Path(__file__).parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
WORLD = {"llama3_8b_128k.yaml": 64}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load_and_validate(path):
    cfg = load(path=str(path))
    validate_job(cfg, WORLD.get(path.name, 4))
    assert "parallel:" in to_yaml(cfg)


def test_the_real_cluster_example_is_8b_at_128k_on_64_gpus():
    cfg = load(path=str(ROOT / "configs" / "llama3_8b_128k.yaml"))
    dims = validate_job(cfg, 64)
    assert (dims.cp, dims.dp_shard, cfg.train.seq_len, cfg.model.dim, cfg.model.n_layers) == (8, 8, 131072, 4096, 32)
    from longctx.model.llama import Transformer
    from longctx.train.metrics import model_flops_per_step

    params = 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) + 2 * 128256 * 4096 + 32 * 2 * 4096 + 4096
    assert 7.9e9 < params < 8.1e9  # Llama-3-8B: 8.03B parameters
    assert model_flops_per_step(cfg.model, 131072, 8)["total"] > 0 and Transformer  # the shapes build


def _tiny(*overrides):
    return load(path=str(ROOT / "configs" / "tiny.yaml"), overrides=list(overrides))


@pytest.mark.parametrize("overrides,world,pattern", [
    (["train.stpes=3"], 4, r"unknown config key 'train.stpes' \(in overrides\); did you mean 'train.steps'\?"),
    (["paralel.cp=2"], 4, r"unknown config key 'paralel' \(in overrides\); did you mean 'parallel'\?"),
    (["zzz=2"], 4, r"unknown config key 'zzz' \(in overrides\); valid keys here: model, parallel, train, data"),
    (["train.steps=many"], 4, r"config key 'train.steps' \(in overrides\): Value 'many' of type 'str' could not be "
                              r"converted to Integer"),
    (["parallel.cp=2.5"], 4, r"'parallel.cp'"),
    (["steps=3"], 4, r"unknown config key 'steps'"),
    (["parallel=2"], 4, r"'parallel' \(in overrides\) is a section"),
    (["nonsense"], 4, r"override 'nonsense' is not key=value"),
    (["parallel.strategy=spiral"], 4, r"unknown strategy 'spiral'; choose one of ring, zigzag, striped, allgather"),
    (["parallel.kernel=cuda"], 4, r"parallel.kernel='cuda' is not a kernel backend; choose one of auto, "),
    (["parallel.engine=zero"], 4, r"parallel.engine='zero' is not one of auto, torch, fsdp, ddp, deepspeed"),
    (["parallel.engine=ddp", "parallel.dp_shard=2", "parallel.cp=2"], 4, r"engine=ddp replicates parameters"),
    (["parallel.activation_checkpoint=some"], 4, r"choose one of none, full, selective"),
    (["train.precision=fp8"], 4, r"train.precision='fp8': choose one of auto, fp32, bf16"),
    (["parallel.dp_shard=2", "parallel.cp=2"], 3, r"multiply to 4 .* but the world size is 3"),
    (["parallel.dp_shard=2"], 3, r"world size 3 is not divisible by the product of the other degrees \(2"),
    ([], 3, r"train.seq_len 4096 is not divisible by 6 .*pad it by 2 tokens to 4098"),
    (["parallel.cp=2"], 4, r"multiply to 2 .* but the world size is 4"),
    (["parallel.dp_shard=-1"], 4, r"at most one parallel degree may be -1"),
    (["train.seq_len=4100"], 4, r"train.seq_len 4100 is not divisible by 8 \(strategy 'zigzag' with the zigzag layout "
                                r"over 4 context ranks needs a multiple of 8\); pad it by 4 tokens to 4104"),
    (["parallel.strategy=ulysses", "model.n_heads=2", "model.n_kv_heads=2", "model.dim=32"], 4,
     r"model.n_heads=2 with parallel.cp=4: ulysses: 2 query heads do not divide over 4 ranks; use a number of context "
     r"ranks that divides the heads "
     r"\(e.g. 2\), or the ring/zigzag strategy"),
    (["parallel.strategy=hybrid", "parallel.ulysses=4", "model.n_heads=2", "model.n_kv_heads=2",
      "model.dim=32"], 4, r"model.n_heads=2 with parallel.cp=4, parallel.ulysses=4: hybrid ulysses: 2 query heads do "
                          r"not divide over 4 ranks"),
    (["train.batch_size=3", "parallel.dp_shard=2", "parallel.cp=2"], 4,
     r"train.batch_size=3 sequences cannot be split over 2 data-parallel ranks x 1 accumulation steps.*"
     r"train.batch_size=4 or 2"),
    # tensor / pipeline / DeepSpeed (tiny.yaml: 4 heads, 2 kv heads, 2 layers, batch 2)
    (["parallel.tp=4", "parallel.cp=1", "model.n_heads=6", "model.n_kv_heads=6", "model.dim=48"], 4,
     r"model.n_heads=6 is not divisible by parallel.tp=4; choose a tp degree that divides the heads"),
    (["parallel.tp=4", "parallel.cp=1", "model.n_heads=12", "model.n_kv_heads=3", "model.dim=48"], 4,
     r"model.n_kv_heads=3 and parallel.tp=4 do not divide one another: .*one must divide the other"),
    (["parallel.tp=2", "parallel.cp=2", "parallel.strategy=ulysses", "model.n_heads=2", "model.n_kv_heads=2",
      "model.dim=32"], 4, r"model.n_heads=2 / parallel.tp=2 = 1 heads per tensor-parallel rank: ulysses: 1 query "
                          r"heads do not divide over 2 ranks"),
    (["parallel.tp=2", "parallel.cp=2", "parallel.engine=ddp"], 4, r"parallel.tp=2 needs FSDP2 .*parallel.engine=fsdp"),
    (["train.resume=auto"], 4, r"train.resume=auto continues the run whose checkpoints are under run_dir, but run_dir "
                               r"is not set: every launch names a new runs/NAME-TIMESTAMP.*set run_dir=DIR"),
    (["parallel.cp=1", "parallel.dp_replicate=4", "parallel.engine=fsdp"], 4,
     r"parallel.engine=fsdp shards over parallel.dp_shard x cp, which is 1 here.*parallel.dp_shard=4"),
    (["parallel.tp=2", "parallel.cp=2", "model.vocab_size=255"], 4, r"model.vocab_size=255 is not divisible by "
                                                                     r"parallel.tp=2"),
    (["parallel.pp=4", "parallel.cp=1"], 4, r"parallel.pp=4 x 1 stage\(s\) per rank = 4 pipeline stages, but the "
                                            r"model has only model.n_layers=2"),
    (["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=interleaved_1f1b"], 4,
     r"4 pipeline stages, but the model has only model.n_layers=2.*parallel.pp_virtual"),
    (["parallel.pp=2", "parallel.cp=2", "parallel.microbatches=1"], 4,
     r"pp_schedule=1f1b needs at least as many microbatches as pipeline ranks: parallel.microbatches=1 < "
     r"parallel.pp=2"),
    (["parallel.pp=2", "parallel.cp=1", "parallel.pp_schedule=dualpipev", "model.n_layers=4", "train.batch_size=4"], 2,
     r"dualpipev needs at least as many microbatches as stages \(4\), got 2 \(parallel.microbatches=0: one per "
     r"pipeline rank\); raise parallel.microbatches to 4"),
    (["parallel.pp=2", "parallel.cp=2", "parallel.microbatches=4"], 4,
     r"micro-batch \(2 sequences = train.batch_size / \(dp x train.accumulation\)\) is not divisible by "
     r"parallel.microbatches=4"),
    (["parallel.pp=2", "parallel.cp=1", "parallel.microbatches=4", "train.batch_size=4", "train.accumulation=2"], 2,
     r"micro-batch \(2 sequences = .*make train.batch_size a multiple of dp x train.accumulation x microbatches"),
    (["parallel.pp=2", "parallel.cp=1", "parallel.pp_schedule=interleaved_zb", "parallel.pp_virtual=1",
      "parallel.activation_checkpoint=full", "parallel.reshard_after_forward=false", "train.batch_size=4"], 2,
     r"parallel.activation_checkpoint=full with parallel.pp_schedule=interleaved_zb: a split-backward schedule "
     r"recomputes every checkpointed block twice"),
    (["train.steps=1", "train.warmup_steps=3", "train.decay_steps=1"], 4,
     r"train.decay_steps=1: no step is left after the warmup \(train.steps=1, train.warmup_steps=3\)"),
    (["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=1fb1"], 4,
     r"parallel.pp_schedule='1fb1' is not a schedule \(did you mean '1f1b'\?\)"),
    (["parallel.pp=2", "parallel.cp=2", "parallel.pp_schedule=zbv", "parallel.pp_virtual=3"], 4,
     r"pp_schedule=zbv runs 2 stage\(s\) per rank, got parallel.pp_virtual=3"),
    (["parallel.pp=2", "parallel.cp=2", "model.n_layers=4", "parallel.pp_schedule=zbv"], 4,
     r"pp_schedule=zbv splits each backward .* FSDP2 with parallel.reshard_after_forward=true .*\(wrong gradients\); "
     r"set parallel.reshard_after_forward=false"),
    (["parallel.pp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.cp=1", "model.n_layers=4",
      "parallel.pp_schedule=interleaved_zb", "train.batch_size=4"], 4, r"pp_schedule=interleaved_zb splits each"),
    (["parallel.engine=deepspeed", "parallel.tp=2", "parallel.cp=2"], 4,
     r"parallel.engine=deepspeed with parallel.tp=2 is not supported.*parallel.engine=torch"),
    (["parallel.engine=deepspeed", "parallel.zero_stage=4"], 4, r"parallel.zero_stage=4: choose 1, 2 or 3"),
    (["parallel.engine=deepspeed", "checkpoint.interval=2", "checkpoint.async_save=true"], 4,
     r"checkpoint.async_save=true is a DCP feature.*set checkpoint.async_save=false"),
    (["parallel.zero_stage=3"], 4, r"parallel.zero_stage / parallel.deepspeed_config apply only to "
                                   r"parallel.engine=deepspeed"),
    (["parallel.pp_split=[1]"], 4, r"parallel.pp_split applies only to a pipeline \(parallel.pp > 1\); remove it"),
    (["parallel.pp_schedule=zbv"], 4, r"parallel.pp_schedule applies only to a pipeline \(parallel.pp > 1\); remove "
                                      r"it"),
    (["parallel.pp=2", "parallel.cp=2", "parallel.pp_virtual=-1"], 4, r"parallel.pp_virtual=-1 must be >= 0"),
    (["parallel.pp=2", "parallel.cp=2", "model.n_layers=4", "parallel.pp_schedule=interleaved_1f1b",
      "parallel.microbatches=5", "train.batch_size=5"], 4, r"microbatches to be a multiple of max\(1, "
                                                           r"microbatches // pp\)"),
    (["parallel.tp=2", "parallel.cp=2", "train.mlp_chunks=2"], 4, r"train.mlp_chunks=2 with parallel.tp=2 is not "
                                                                  r"supported"),
    (["parallel.tp=2", "parallel.cp=2", "parallel.strategy=ring", "model.dilated.layers=[1]",
      "model.dilated.w0=64"], 4, r"model.dilated.layers with parallel.tp=2 is not supported"),
    (["parallel.meta_init=true", "parallel.engine=deepspeed"], 4, r"parallel.meta_init=true with "
                                                                    r"parallel.engine=deepspeed needs "
                                                                    r"parallel.zero_stage=3 \(ZeRO 1 keeps"),
    (["model.dilated.layers=[1]", "model.dilated.w0=64"], 4, r"model.dilated.layers need the contiguous token layout"),
    (["parallel.meta_init=true"], 4, r"parallel.meta_init=true builds the model on the meta device .* but "
                                     r"engine=ddp broadcasts"),
    (["model.rope_theta=0"], 4, r"model.rope_theta must be a finite number > 1"),
    (["model.rope_theta=inf"], 4, r"model.rope_theta must be a finite number > 1 .*got inf"),
    (["model.head_dim=0"], 4, r"model.head_dim must be null \(dim / n_heads\) or a positive int, got 0"),
    (["model.head_dim=15"], 4, r"head_dim 15 must be even for RoPE; change model.head_dim"),
    (["model.dim=130"], 4, r"model.dim 130 must be divisible by model.n_heads 4 \(or set model.head_dim\)"),
    (["run_dir=" + __file__], 4, r"is an existing file, not a directory"),
    (["data.task=poetry"], 4, r"data.task='poetry': choose one of induction, copy, random"),
    (["train.lr=0"], 4, r"train.lr must be > 0"),
    (["model.n_kv_heads=3"], 4, r"model.n_heads 4 must be a multiple of model.n_kv_heads 3"),
    (["parallel.timeout_s=0.01"], 4, r"parallel.timeout_s=0.01 s is too short for the ranks to connect; give at "
                                     r"least 1"),
    # a setting given (not the schema's default) that the job would leave without effect
    (["data.path=/tmp"], 4, r"data.path='/tmp' is not read by data.source=synthetic; it applies to "
                            r"data.source=tokens: set that source, or drop data.path"),
    (["data.source=passkey", "data.depth=0.5"], 4, r"data.depth=0.5 is not read by data.source=passkey; it applies "
                                                   r"to data.source=needle"),
    (["data.pack_min=64"], 4, r"data.pack_min=64 is not read by data.source=synthetic; it applies to "
                              r"data.source=needle or passkey or recall"),
    (["data.shuffle=false"], 4, r"data.shuffle=False is not read by data.source=synthetic; it applies to "
                                r"data.source=tokens"),
    (["model.rope_scaling.factor=16"], 4, r"model.rope_scaling.factor=16.0 has no effect with "
                                          r"model.rope_scaling.type=none \(it reads nothing\); factor applies to "
                                          r"type=linear or llama3 or yarn"),
    # each scaling type reads its own keys (model/rope.py): the others' are refused, not carried along
    (["model.rope_scaling.type=linear", "model.rope_scaling.factor=2", "model.rope_scaling.beta_fast=64"], 4,
     r"model.rope_scaling.beta_fast=64.0 has no effect with model.rope_scaling.type=linear \(it reads factor\); "
     r"beta_fast applies to type=yarn"),
    (["model.rope_scaling.type=yarn", "model.rope_scaling.factor=2", "model.rope_scaling.original_max_positions=64",
      "model.rope_scaling.high_freq_factor=8"], 4, r"high_freq_factor=8.0 has no effect with .*type=yarn"),
    (["model.rope_scaling.type=llama3", "model.rope_scaling.factor=2", "model.rope_scaling.original_max_positions=64",
      "model.rope_scaling.beta_slow=0.5"], 4, r"beta_slow=0.5 has no effect with .*type=llama3"),
    (["parallel.cp=1", "parallel.strategy=ring", "model.dilated.layers=[0]", "model.dilated.segment_lengths=[32,64]",
      "model.dilated.dilation_rates=[1,2]", "model.dilated.alpha=4"], 1,
     r"model.dilated.alpha=4 has no effect: model.dilated.segment_lengths are given"),
    (["train.resume=.", "train.init_from=."], 1, r"train.init_from='.' has no effect with train.resume='.'"),
    (["parallel.reshard_after_forward=false", "parallel.engine=ddp"], 4,
     r"parallel.reshard_after_forward=false is an FSDP2 setting, and parallel.engine=ddp never reads it"),
    (["parallel.strategy=ulysses", "parallel.balance_documents=true", "data.source=passkey", "data.pack_min=64"], 4,
     r"parallel.balance_documents=true .* parallel.strategy=ulysses gives every rank the whole sequence"),
    (["checkpoint.on_signal=false", "checkpoint.keep_last=1"], 1,
     r"checkpoint.keep_last=1 has no effect: this run writes no checkpoint"),
    (["model.hf_path="], 1, r"model.hf_path is empty"),
    (["parallel.timeout_s=1e13"], 1, r"parallel.timeout_s=10000000000000.0 is too large for a timeout"),
    # DDP never composes with tp: refused without data ranks too, where the same file would fail once it had some
    (["parallel.tp=2", "parallel.cp=1", "parallel.engine=ddp"], 2, r"parallel.tp=2 needs FSDP2"),
    (["model.dilated.w0=16"], 4, r"model.dilated.w0=16 has no effect without dilated layers"),
    (["parallel.cp=1", "parallel.strategy=ring", "model.dilated.layers=[0]", "model.dilated.w0=64",
      "train.seq_len=96"], 1, r"model.dilated: the pattern derived from w0=64, alpha=2 and train.seq_len=96 does not "
                              r"hold \(.*\); set train.seq_len to w0 x alpha\^k \(e.g. 128\)"),
    (["parallel.strategy=ring", "model.n_kv_heads=4", "model.dilated.layers=[0,1]", "model.window=2"], 4,
     r"model.window=2 has no effect: every layer is dilated"),
    (["parallel.ac_every=3"], 4, r"parallel.ac_every=3 applies to parallel.activation_checkpoint=selective \(this "
                                 r"job: none\)"),
    (["parallel.balance_documents=true"], 4, r"parallel.balance_documents=true reorders the documents packed in a "
                                             r"sequence, and data.source=synthetic packs none"),
    (["train.lr_schedule=constant", "train.decay_steps=2"], 4, r"train.decay_steps=2 has no effect with "
                                                               r"train.lr_schedule=constant"),
    (["train.lr_schedule=constant", "train.min_lr_ratio=0"], 4, r"train.min_lr_ratio=0.0 has no effect with "),
    (["train.lr_schedule=wsd"], 4, r"train.lr_schedule='wsd': choose one of cosine, linear, constant"),
    (["train.steps=10", "train.warmup_steps=2", "train.decay_steps=9"], 4,
     r"train.decay_steps=9 is more than the 8 steps after the warmup .*use at most 8"),
    (["train.steps=10", "train.warmup_steps=0", "train.decay_steps=10"], 4,  # then no step would reach the peak
     r"train.decay_steps=10 is more than the 9 steps after the first, which is the peak .*use at most 9"),
    (["train.decay_steps=-1"], 4, r"train.decay_steps must be >= 0"),
    (["validation.batches=8"], 4, r"validation.batches=8 has no effect with validation.interval=0 \(validation "
                                  r"off\); set validation.interval=N"),
    # found up front, not in the first forward (DTensor's sharding error; DilatedAttention has no documents)
    (["parallel.tp=2", "parallel.cp=1", "parallel.dp_shard=1", "model.ffn_dim=129"], 2,
     r"model.ffn_dim=129 is not divisible by parallel.tp=2: .* \(e.g. 130\)"),
    (["model.window=1"], 1, r"model.window=1 lets each token attend to itself only"),
    (["model.dilated.layers=[1]", "data.source=passkey", "data.pack_min=40", "train.seq_len=256"], 1,
     r"data.source=passkey with data.pack_min=40 packs documents, and LongNet dilated layers do not take"),
])
def test_bad_configs(overrides, world, pattern):
    with pytest.raises(ConfigError, match=pattern):
        validate_job(_tiny(*overrides), world)


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file 'no/such.yaml' not found"):
        load(path="no/such.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load(path=str(bad))
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load(path=str(scalar))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'train.batchsize' \(in .*typo.yaml\); did you mean "
                                          r"'train.batch_size'"):
        load(path=str(typo))


def test_no_code_runs_from_a_config(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("run_dir: ${oc.env:HOME}\n")  # plain interpolation resolves; it cannot execute anything
    assert load(path=str(evil)).run_dir
    evil.write_text("run_dir: ${eval:'__import__(\"os\").getcwd()'}\n")
    with pytest.raises(ConfigError, match="does not resolve"):
        load(path=str(evil))


def test_deepspeed_config_file_cannot_override_what_longctx_derives(tmp_path):
    bad = tmp_path / "ds.json"
    for text, said in [
        ('{"gradient_accumulation_steps": 4, "scheduler": {"type": "WarmupLR"}, "zero_optimization": {}}',
         r"sets gradient_accumulation_steps, scheduler, which longctx derives from train.accumulation; "
         r"train.lr_schedule / warmup_steps"),
        ('{"checkpoint": {"writer": {"type": "decoupled"}}}',
         r"sets checkpoint, which longctx derives from checkpoint.\* \(longctx writes DeepSpeed's checkpoints "
         r"synchronously"),
        # nested keys too: a stage or autocast set here would train as it while the run records the config's
        ('{"zero_optimization": {"stage": 3}, "torch_autocast": {"enabled": true}}',
         r"sets torch_autocast, zero_optimization.stage, which longctx derives from train.precision; "
         r"parallel.zero_stage: set those keys instead"),
        ('{"zero_force_ds_cpu_optimizer": true, "zero_allow_untested_optimizer": false}',
         r"sets zero_allow_untested_optimizer, zero_force_ds_cpu_optimizer, which longctx derives from train.lr / "
         r"weight_decay / beta1 / beta2 \(longctx steps torch's AdamW\): set"),
        ("{not json", r"is not valid JSON"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=said):
            validate_job(_tiny("parallel.engine=deepspeed", f"parallel.deepspeed_config={bad}"), 4)
    good = tmp_path / "ok.json"
    good.write_text('{"zero_optimization": {"overlap_comm": false}}')
    from longctx.parallel.deepspeed_engine import ds_config

    cfg = _tiny("parallel.engine=deepspeed", "parallel.zero_stage=2", f"parallel.deepspeed_config={good}")
    conf = ds_config(cfg, validate_job(cfg, 4))
    assert conf["zero_optimization"] == {"stage": 2, "overlap_comm": False} and conf["gradient_clipping"] == 1.0


def test_a_config_never_executes_code(tmp_path):
    """No resolver that evaluates expressions is registered: `${eval:...}` is an error, not a computation."""
    from omegaconf import OmegaConf

    import longctx.train  # noqa: F401 - everything a training job imports is loaded

    assert not any(OmegaConf.has_resolver(name) for name in ("eval", "python", "exec"))
    bad = tmp_path / "evil.yaml"
    bad.write_text("run_dir: ${eval:'__import__(\"os\").getcwd()'}\n")
    with pytest.raises(Exception) as info:
        cfg = load(path=str(bad))
        str(cfg.run_dir)
    assert "eval" in str(info.value)


def test_text_keys_keep_what_was_typed():
    """YAML would read 007 as the number 7 and `no` as false (OmegaConf then stored '7' and 'False'): a text key
    keeps the text; null and quoted text are still YAML's."""
    cfg = load(overrides=["checkpoint.dir=007", "run_dir=no", "train.resume=1:30", "data.path=null",
                          "validation.path='x y'"])
    assert (cfg.checkpoint.dir, cfg.run_dir, cfg.train.resume) == ("007", "no", "1:30")
    assert cfg.data.path is None and cfg.validation.path == "x y"
    # in order, whichever way a value is read: the last of a key's overrides wins
    assert load(overrides=["run_dir=abc", "run_dir=null"]).run_dir is None
    assert load(overrides=["run_dir=null", "run_dir=abc"]).run_dir == "abc"


def test_yaml_1_1_numbers_are_refused_and_text_keys_in_files_ask_for_quotes(tmp_path):
    """OmegaConf reads YAML 1.1: 010 is octal 8 and 1:30 base-60 90, as a value or in a file; a file's text key
    written 2024_01_05 or `no` would become '20240105' or 'False'. Each is refused by key, with what to write."""
    for override, words in [("train.steps=010", "reads 010 as 8"), ("train.steps=1:30", "base-60"),
                            ("train.lr=1:30", "base-60"), ("model.dilated.layers=[0,010]", "write 10")]:
        with pytest.raises(ConfigError, match=words) as e:
            load(overrides=[override])
        assert override.split("=")[0] in str(e.value)
    assert load(overrides=["train.steps=01", "train.lr=0.5"]).train.steps == 1  # 01 is 1 whichever way it is read
    for text, words in [("run_dir: 2024_01_05", "run_dir: '2024_01_05'"), ("checkpoint: {dir: 0755}", "dir: '0755'"),
                        ("data: {task: no}", "task: 'no'"), ("train: {steps: 010}", "write 10"),
                        ("model: {dilated: {layers: [1, 1:10]}}", "base-60")]:
        path = tmp_path / "c.yaml"
        path.write_text(text + "\n")
        with pytest.raises(ConfigError, match=words):
            load(path=str(path))
    path.write_text("run_dir: '007'\ncheckpoint: {dir: 7}\ntrain: {steps: 12, lr: 1.0e-3}\n")
    cfg = load(path=str(path))
    assert (cfg.run_dir, cfg.checkpoint.dir, cfg.train.steps) == ("007", "7", 12)


def test_bad_interpolation_in_a_text_override_is_one_error_and_switches_take_interpolations(monkeypatch):
    with pytest.raises(ConfigError, match=r"could not parse override 'run_dir=/x/\$\{y'"):
        load(overrides=["run_dir=/x/${y"])
    monkeypatch.setenv("LONGCTX_TEST_QUIET", "true")
    assert load(overrides=["logging.quiet=${oc.env:LONGCTX_TEST_QUIET,false}"]).logging.quiet is True
    monkeypatch.setenv("LONGCTX_TEST_QUIET", "maybe")
    with pytest.raises(ConfigError, match="not a valid bool"):
        load(overrides=["logging.quiet=${oc.env:LONGCTX_TEST_QUIET,false}"])
    # an override may name another key, as a file may: resolved against the whole config, then typed
    cfg = load(overrides=["model.n_heads=8", "model.n_kv_heads=${model.n_heads}", "train.grad_clip=${train.lr}"])
    assert cfg.model.n_kv_heads == 8 and cfg.train.grad_clip == cfg.train.lr
    with pytest.raises(ConfigError, match=r"does not resolve: .*'\$\{run_dir\}'.*Incompatible value 'None'"):
        load(overrides=["model.n_kv_heads=${run_dir}"])
    with pytest.raises(ConfigError, match="does not resolve: Interpolation key 'model.nope' not found"):
        load(overrides=["model.n_kv_heads=${model.nope}"])


def test_interpolations_resolve_to_what_the_key_means_and_required_values_are_given(tmp_path):
    # a text embedding a null key would read "None" (checkpoint.dir=${run_dir}/ck wrote into ./None/ck)
    with pytest.raises(ConfigError, match=r"'checkpoint.dir'='\$\{run_dir\}/ck' names run_dir, which is null here, so "
                                          r"it would read 'None/ck'; give run_dir a value"):
        load(overrides=["checkpoint.dir=${run_dir}/ck"])
    assert load(overrides=["run_dir=/r", "checkpoint.dir=${run_dir}/ck"]).checkpoint.dir == "/r/ck"
    # a switch given another key's number is refused as the number itself is (OmegaConf: 20 -> true)
    with pytest.raises(ConfigError, match=r"'data.shuffle'=\$\{train.steps\} resolves to 30: it must be true or "
                                          r"false"):
        load(path="configs/tiny.yaml", overrides=["data.shuffle=${train.steps}"])
    assert load(overrides=["data.shuffle=${logging.quiet}", "logging.quiet=false"]).data.shuffle is False
    # ??? (OmegaConf's "still to be given") was merged as "keep the default"
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: ???\n")
    for where in ({"path": str(path)}, {"overrides": ["data.path=???"]}):
        with pytest.raises(ConfigError, match=r"'(train.steps|data.path)' \(in .*\) is \?\?\?, a value still to be "
                                              r"given: give it one"):
            load(**where)


def test_resume_auto_needs_a_run_dir_or_a_checkpoint_dir(tmp_path):
    validate_job(_tiny("train.resume=auto", f"run_dir={tmp_path / 'run'}"), 4)
    validate_job(_tiny("train.resume=auto", f"checkpoint.dir={tmp_path / 'checkpoints'}"), 4)


def test_a_loaded_config_is_its_own():
    """The schema's defaults are built once and shared (config._defaults): no loaded config is that copy, so
    changing one changes no later load."""
    from longctx.config import from_dict

    plain, merged = load(), load(overrides=["model.dim=64"])
    plain.model.dim, merged.train.steps = 3, 7
    again = from_dict(OmegaConf.to_container(load()))
    again.model.n_layers = 5
    fresh = load()
    assert (fresh.model.dim, fresh.train.steps, fresh.model.n_layers) == (128, 20, 2)

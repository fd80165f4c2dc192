import json
import os
import subprocess
import sys
import tempfile

import pytest

from longctx._optional import MissingDependency, require
from longctx.cli import build_parser, info, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
FAST = ["train.steps=3", "train.seq_len=256", "train.batch_size=2", "model.dim=32", "model.ffn_dim=64",
        "logging.tensorboard=false"]


def test_info_lists_backends_and_reasons():
    text = info()
    assert "torch" in text and "kernel backends" in text
    for name in ("reference", "sdpa", "flash"):
        assert name in text
    assert "falls back to reference" in text
    # what each computes beyond one head width and plain scores, so a soft-capped model's kernel is chosen knowingly
    assert "sdpa       priority  10  available; computes one head width, no soft-capping" in text
    assert "reference  priority   0  available; computes v of its own width, soft-capping" in text


def test_main_info(capsys):
    assert main(["info"]) == 0
    assert "longctx" in capsys.readouterr().out


def test_help_lists_commands():
    text = build_parser().format_help()
    for word in ("train", "launch", "config", "bench", "demo", "info"):
        assert word in text


def test_version(capsys):
    from longctx import __version__

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"longctx {__version__}"


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(MissingDependency, match=r"pip install 'longctx\[flash\]'"):
        require("flash_attn", "flash-attn kernels")
    with pytest.raises(MissingDependency, match="pip install no_such_pkg_xyz"):
        require("no_such_pkg_xyz")


@pytest.mark.parametrize("argv,pattern", [
    (["bench", "attention", "--seq-len", "100", "--world-size", "3"], r"--seq-len \(ring\) 100 is not divisible by 3"),
    (["bench", "attention", "--head-dim", "0"], r"--head-dim must be a positive integer below 2\*\*63, got 0"),
    (["bench", "kernel", "--head-dim", str(2**63)], r"--head-dim must be a positive integer below 2\*\*63"),
    (["bench", "kernel", "--seq-lens", str(10**20)], r"--seq-lens: '1000+' holds a number beyond 64 bits"),
    # below 2**63 each, but their product overflows torch's or numpy's size arithmetic: no traceback either
    (["bench", "kernel", "--backends", "reference", "--seq-lens", str(2**62), "--heads", "2", "--head-dim", "8",
      "--dtype", "float32", "--check-len", "0"], r"out of memory \(Storage size calculation overflowed"),
    (["bench", "packing", "--seq-len", str(2**62), "--world-size", "2", "--batch", "1", "--mean-doc", str(2**62)],
     r"out of memory \(array is too big"),
    (["bench", "attention", "--json", os.path.join(tempfile.gettempdir(), "lc-same.png"), "--plot",
      os.path.join(tempfile.gettempdir(), "lc-same")], r"--json .*lc-same.png and --plot .*lc-same name the same file"),
    (["bench", "decode", "--heads", str(10**20)], r"--heads must be a positive integer below 2\*\*63"),
    (["bench", "attention", "--strategies", "ring", "--ulysses", "4"], r"--ulysses applies to the hybrid strategy, "
                                                                       r"which --strategies 'ring' leaves out"),
    (["bench", "kernel", "--schedule", "striped"], r"--schedule striped applies to --virtual-ranks P"),
    # given at their default values they still do nothing (they were accepted)
    (["bench", "kernel", "--schedule", "zigzag"], r"--schedule zigzag applies to --virtual-ranks P"),
    (["bench", "attention", "--strategies", "ring", "--hybrid-layout", "zigzag"],
     r"--hybrid-layout applies to the hybrid strategy, which --strategies 'ring' leaves out"),
    (["bench", "attention", "--strategies", "hybrid", "--world-size", "4", "--hybrid-layout", "ring"],
     r"--hybrid-layout 'ring': choose one of contiguous, zigzag, striped"),
    (["bench", "dilated", "--no-check", "--check-max-len", "131072"],
     r"--check-max-len applies to the float64 check, which --no-check turns off"),
    (["bench", "attention", "--strategies", "zigzag,spiral"], r"unknown strategy 'spiral'"),
    (["bench", "kernel", "--heads", "6", "--kv-heads", "4"], r"--heads 6 must be a multiple of --kv-heads 4"),
    (["bench", "dilated", "--segment-lengths", "1000", "--seq-len", "4096"], r"bad dilated pattern"),
    (["bench", "decode", "--strategies", "spiral"], r"unknown decode strategies \['spiral'\]"),
    (["bench", "train", "--config", TINY, "--layouts", "cp"], r"layout 'cp' must be key=value pairs"),
    (["bench", "train", "--config", TINY, "--layouts", "cp=3"], r"multiply to 3 .* world size is 4"),
    (["bench", "nope"], r"invalid choice: 'nope'"),
    (["bench", "attention", "--kernel", "trtion"], r"--kernel 'trtion' is not a kernel backend; choose one of auto"),
    (["bench", "attention", "--kernel", "flash"], r"--kernel flash cannot run here: .*; use --kernel auto"),
    (["bench", "attention", "--backend", "mpi"], r"--backend 'mpi' is not a process group backend"),
    (["bench", "attention", "--window", "-1"], r"--window must be a positive integer"),
    (["bench", "decode", "--kernel", "nope"], r"--kernel 'nope' is not a kernel backend"),
    (["bench", "dilated", "--backend", "nope"], r"--backend 'nope' is not a process group backend"),
    (["bench", "kernel", "--backends", "triton,sdpa,trtion"], r"--backends 'triton,sdpa,trtion': unknown trtion; "
                                                              r"choose from .*torch-flash"),
    (["bench", "kernel", "--backends", ","], r"--backends ',' has an empty item; separate the values by single"),
    (["bench", "kernel", "--backends", "flash"], r"--backends 'flash': none can run here \(flash: flash-attn not"),
    (["bench", "attention", "--strategies", "ring,,zigzag"], r"--strategies 'ring,,zigzag' has an empty item"),
    (["bench", "kernel", "--seed", "-1"], r"--seed: must be between 0 and 2\*\*63 - 1"),
    (["bench", "dilated", "--seed", "99999999999999999999999"], r"--seed: must be between 0 and 2\*\*63 - 1"),
    (["bench", "packing", "--world-size", "2,,4"], r"--world-size: '2,,4' is not a comma-separated list of integers"),
    (["config", "show", TINY, "train.seed=99999999999999999999999"], r"train.seed=9+ does not fit a 64-bit integer"),
    (["config", "show", TINY, "parallel.pp_split=abc"], r"parallel.pp_split.*must be a list, e.g. parallel.pp_split="),
    (["data", "prepare", "--input", TINY, "--output", "/proc/x"], r"--output /proc/x cannot be written"),
    (["bench", "train", "--config", TINY, "--layouts", "train.lr=1"], r"give train.\* keys to every layout with "
                                                                       r"--overrides"),
    (["config", "show", "/dev/null"], r"config file '/dev/null' is not a regular file"),
    (["checkpoint", "export", "", "out.pt"], r"'' does not exist; give a checkpoint directory"),
    (["checkpoint", "verify", "/nonexistent"], r"'/nonexistent' is not a directory; give a checkpoint"),
    (["checkpoint", "verify", os.path.dirname(__file__)], r"holds no step_NNNNNNNN checkpoint directories; give"),
    (["launch", "ray", "--num-workers", "1", "--max-failures", "-1", TINY],
     r"--max-failures must be a finite number >= 0, got -1"),
    (["launch", "ray", "--num-workers", "1", "--gpus-per-worker", "nan", TINY],
     r"--gpus-per-worker must be a finite number >= 0, got nan"),
    (["bench", "kernel", "--window", "0"], r"--window must be a positive integer"),
    (["bench", "kernel", "--device", "tpu"], r"--device 'tpu'"),
    (["bench", "kernel", "--seq-lens", "96,100", "--virtual-ranks", "3"],
     r"--seq-lens \(3 virtual ranks, zigzag\) 100 is not divisible by 6 .* pad it by 2 tokens to 102"),
    (["train", TINY, "train.stepz=3"], r"unknown config key 'train.stepz' \(in overrides\); did you mean "
                                       r"'train.steps'"),
    (["train", "no/such.yaml"], r"config file 'no/such.yaml' not found"),
    (["train", TINY, "train.steps=x"], r"'train.steps' \(in overrides\): Value 'x'"),
    (["launch", "local", "--nproc", "3", TINY], r"train.seq_len 4096 is not divisible by 6"),
    (["launch", "local", "--nproc", "0", TINY], r"argument --nproc: must be a positive integer, got 0"),
    (["launch", "local", "--nproc", "4", TINY, "parallel.cp=2", "parallel.dp_shard=-1", "parallel.dp_replicate=-1"],
     r"at most one parallel degree may be -1"),
    (["train", TINY, "train.seed=-1"], r"train.seed must be >= 0, got -1"),
    # numbers torch would refuse only inside a rank, or accept and go wrong with
    (["train", TINY, "train.beta1=2"], r"train.beta1 must be < 1.0, got 2.0"),
    (["train", TINY, "train.lr=nan"], r"train.lr must be a finite number > 0, got nan"),
    (["train", TINY, "train.min_lr_ratio=5"], r"train.min_lr_ratio must be <= 1.0"),
    (["launch", "local", "--nproc", "1", TINY, "parallel.timeout_s=inf"], r"parallel.timeout_s must be a finite"),
    (["train", TINY, "parallel.timeout_s=1e300"], r"parallel.timeout_s=1e\+300 is too large for a timeout"),
    (["train", TINY, "parallel.pp_schedule=bogus"], r"parallel.pp_schedule='bogus' is not a schedule"),
    (["launch", "local", "--nproc", "1", "--timeout", "-1", TINY],
     r"argument --timeout: must be a positive number of seconds, got -1"),
    (["config", "show", TINY, "parallel.kernel=null"], r"'parallel.kernel' \(in overrides\): cannot be null: give "),
    (["config", "show", TINY, "train.resume=/"], r"train.resume='/' holds no complete checkpoint"),  # before ranks
    (["config", "show", TINY, "model.dim=[1"], r"could not parse override 'model.dim=\[1'"),
    # what YAML and OmegaConf would turn into something else, or fail on with a TypeError
    (["config", "show", TINY, "checkpoint.async_save=255"], r"'checkpoint.async_save' \(in overrides\) must be "
                                                            r"true or false, got 255"),
    (["config", "show", TINY, "model.dilated.layers={}"], r"'model.dilated.layers' \(in overrides\) takes a list "
                                                          r"of numbers, e.g. \[2,4\], got \{\}"),
    (["config", "show", TINY, "parallel.pp_split=[[1]]"], r"'parallel.pp_split' \(in overrides\) takes a list of "
                                                          r"numbers"),
    (["config", "show", TINY, "train.lr={a: 1}"], r"'train.lr' \(in overrides\) takes a single float value"),
    # numbers that train without positions, without learning, or crash at step 1
    (["config", "show", TINY, "model.rope_scaling.type=linear", "model.rope_scaling.factor=inf"],
     r"model.rope_scaling.factor must be a finite number, got inf"),
    (["config", "show", TINY, "model.rope_scaling.type=yarn", "model.rope_scaling.factor=4",
      "model.rope_scaling.original_max_positions=64", "model.rope_scaling.beta_fast=inf"],
     r"model.rope_scaling.beta_fast must be a finite number"),
    (["config", "show", TINY, "model.rope_theta=1"], r"model.rope_theta must be a finite number > 1"),
    (["config", "show", TINY, "model.norm_eps=1e300"], r"model.norm_eps must be a number between 0 and 1"),
    (["config", "show", TINY, "train.lr=1e300"], r"train.lr=1e\+300 does not fit a float32"),
    (["config", "show", TINY, "train.eps=1e-50"], r"train.eps=1e-50 is 0 in float32"),
    # a bad w0 or alpha is named as such, not met by a suggested length computed from it (it divided by w0)
    (["config", "show", os.path.join(ROOT, "configs", "tiny_dilated.yaml"), "train.seq_len=64",
      "model.dilated.w0=0"], r"model.dilated: w0 must be a positive int, got 0$"),
    (["config", "show", TINY, "train.lr=0.5", "train.weight_decay=2"], r"train.lr x train.weight_decay = 1: AdamW "
                                                                        r"multiplies each decayed weight"),
    (["config", "show", os.path.dirname(TINY)], r"is a directory; pass a YAML file in it"),
    (["bench", "kernel", "--bogus"], r"unrecognized arguments: --bogus \(see `longctx bench kernel --help`\)"),
    (["train"], r"the following arguments are required: config \(see"),
    # output paths are checked before the work that fills them
    (["train", TINY, f"checkpoint.dir={__file__}"], r"checkpoint.dir .* is an existing file, not a directory"),
    (["train", TINY, f"run_dir={os.path.join(__file__, 'run')}"], r"run_dir .* cannot be created: .* is a file"),
    (["checkpoint", "export", "nope", os.path.join(__file__, "m.pt")], r"OUT .* cannot be created: .* is a file"),
    (["bench", "attention", "--json", os.path.join(__file__, "x.json")], r"--json .* cannot be created"),
    (["bench", "attention", "--plot", ROOT], r"--plot .* is a directory; give a file path"),
    (["bench", "attention", "--json", "/proc/x.json"], r"--json /proc/x.json cannot be written \(.* in /proc\)"),
    (["train", TINY, "train.seq_len=17179869184"], r"train.seq_len=17179869184 x train.batch_size=2 needs at least "
                                                   r".* GiB on each rank .* shorten train.seq_len"),
    (["launch", "local", "--nproc", "2", TINY, "train.seq_len=17179869184", "parallel.cp=2"],
     r"needs at least .* RAM over 2 rank\(s\)"),
    (["bench", "kernel", "--plot", "out.foo"], r"--plot out.foo: matplotlib cannot write .foo files; use one of "),
    (["bench", "attention", "--timeout", "0"], r"argument --timeout: must be a positive number of seconds, got 0"),
    (["launch", "local", "--nproc", "2", "--timeout", "1e20", TINY], r"argument --timeout: 1e20 seconds is too large "
                                                                      r"for a timeout"),
    (["generate", "--checkpoint", "nope", "--ids", "1", "--seed", str(2**70)], r"--seed: must be between 0 and 2"),
    (["train", TINY, "data.source=passkey", "data.alphabet=0", "train.seq_len=128"],
     r"data.alphabet=0 must be a positive int"),
    (["bench", "kernel", "--seq-lens", ","], r"--seq-lens: ',' is not a comma-separated list of integers"),
    (["bench", "packing", "--alpha", "nan"], r"--alpha a finite number > 0"),
    # a write that fails after the work (a full disk): one line naming the flag
    (["bench", "packing", "--seq-len", "64", "--batch", "1", "--mean-doc", "8", "--world-size", "2", "--layouts",
      "zigzag", "--json", "/dev/full"], r"--json /dev/full: writing failed \(No space left on device\)"),
    (["bench", "train", "--config", TINY, "--layouts", "cp=2,cp=4"], r"sets cp more than once"),
    (["bench", "train", "--config", TINY, "--layouts", "cp = 2, cp=4"], r"sets cp more than once"),  # spaces read
    (["bench", "decode", "--strategies", "tree, ring,tree"], r"--strategies 'tree, ring,tree' names tree twice; give "
                                                              r"each once"),
    (["bench", "train", "--config", TINY, "--layouts", "cp=2,"], r"layout 'cp=2,' must be key=value pairs"),
    # a flag that would change nothing is refused, naming what it applies to
    (["bench", "decode", "--strategies", "ring", "--collectives", "1"],
     r"--collectives applies to the tree strategy, which --strategies 'ring' leaves out; add tree, or drop"),
    (["bench", "kernel", "--backends", "torch-math", "--virtual-ranks", "2"],
     r"--virtual-ranks needs a backend that returns the log-sum-exp .* has only SDPA baselines .* add one of "
     r"cudnn, flash, reference, sdpa, triton, or drop --virtual-ranks"),
    # the bench's own flags, not the training config's keys
    (["bench", "attention", "--world-size", "4", "--seq-len", "32", "--heads", "6", "--kv-heads", "3",
      "--strategies", "hybrid", "--ulysses", "2"], r"hybrid ulysses: 3 kv heads \(--kv-heads\) neither divide over "
                                                   r"2 ranks .*; use a --ulysses degree that divides the kv heads"),
    (["bench", "attention", "--strategies", "ulysses", "--heads", "3", "--world-size", "2"],
     r"ulysses: 3 query heads \(--heads\) do not divide over 2 ranks; use a --world-size that divides the heads "
     r"\(e.g. 1\)"),
    (["eval", "ppl", "--checkpoint", "nope", "--json", os.path.join(__file__, "p.json")], r"--json .* cannot be"),
    (["config", "show", TINY, "parallel.strategy=ulysses", "--world-size", "4", "model.n_heads=2", "model.dim=32",
      "model.n_kv_heads=2"], r"2 query heads do not divide over 4 ranks"),
    # a path named as a directory that does not exist yet is still a directory, found before the work
    (["bench", "packing", "--seq-len", "64", "--world-size", "2", "--json", os.path.join(ROOT, "no_such_dir", "")],
     r"--json .*no_such_dir/ is a directory; give a file path"),
    (["launch", "local", "--nproc", "2", "--timeout", "0.0001", TINY], r"--timeout: must be at least 1 second"),
    # one length every layout and world size takes (the first one's multiple, 1002, failed the next)
    (["bench", "packing", "--seq-len", "1001", "--world-size", "2,3"], r"needs a multiple of 12; use 1008"),
    (["eval", "needle", "--checkpoint", "nope", "--lengths", "64,64"], r"--lengths lists 64 more than once"),
    (["bench", "train", "--config", TINY, "--overrides", "train.steps=1"],
     r"--overrides train.steps=1: the bench sets train.steps itself \(use --steps\)"),
    (["bench", "train", "--config", TINY, "--overrides", "run_dir=/tmp/x"], r"the bench sets run_dir itself"),
    (["bench", "train", "--config", TINY, "--overrides", "checkpoint.dir=/tmp/x"],
     r"the bench sets checkpoint.dir itself \(each layout checkpoints into its own run directory"),
    # a layout's parallel.* is applied after --overrides: the override would be dropped without a word
    (["bench", "train", "--config", TINY, "--overrides", "parallel.strategy=ring"],
     r"--overrides parallel.strategy=ring: layout 'cp=-1,strategy=zigzag' \(the default layout\) sets "
     r"parallel.strategy too, and a layout's setting wins; give it in --layouts \(e.g. --layouts "
     r"cp=-1,strategy=zigzag,strategy=...\)"),
    (["bench", "train", "--config", TINY, "--layouts", "cp=2", "dp_shard=2,cp=1", "--world-size", "2",
      "--overrides", "parallel.dp_shard=1"], r"layout 'dp_shard=2,cp=1' sets parallel.dp_shard too"),
    # a bare key=value is an override there too (it was a TypeError)
    (["bench", "train", "--config", TINY, "train.steps=2"], r"--overrides train.steps=2: the bench sets train.steps"),
    # the machine's checks at the world size the layouts run at, as `launch local` makes them
    (["bench", "train", "--config", TINY, "--world-size", "4", "--overrides", "train.seq_len=33554432"],
     r"train.seq_len=33554432 x train.batch_size=\d+ needs at least .* GiB on each rank"),
])
def test_user_errors_are_one_line_with_exit_2(argv, pattern, capsys):
    import re

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("longctx: error: "), err
    assert re.search(pattern, lines[0]), lines[0]


def test_an_expired_bench_timeout_is_one_line(monkeypatch, capsys):
    import longctx.bench.attention as attention

    def expire(args):
        raise TimeoutError("run() timed out")  # what the harness raises when --timeout passes

    monkeypatch.setattr(attention, "run", expire)
    assert main(["bench", "attention", "--timeout", "7"]) == 2
    err = capsys.readouterr().err
    assert "did not finish within --timeout 7 s" in err and err.count("\n") == 1, err


def test_config_show_prints_the_resolved_config(capsys):
    assert main(["config", "show", TINY, "parallel.cp=2", "parallel.dp_shard=2", "--world-size", "4"]) == 0
    out = capsys.readouterr().out
    assert "# valid for 4 rank(s)" in out and "cp: 2" in out and "dp_shard: 2" in out and "strategy: zigzag" in out


@pytest.mark.parametrize("remote_type,rc", [("RuntimeError", 1), ("ValueError", 1), ("ConfigError", 2)])
def test_a_failing_rank_shows_its_traceback(remote_type, rc, monkeypatch, capsys):
    # a rank's ValueError during training is a bug (its traceback is shown); only user-error types are one line
    from longctx import launch
    from longctx.launch import RankError

    def boom(*args, **kwargs):
        raise RankError(f"rank 1 failed with {remote_type}: boom\n\n--- traceback from rank 1 ---\nTraceback ...",
                        1, remote_type, "Traceback ...", None, "boom")

    monkeypatch.setattr(launch, "run", boom)
    assert main(["launch", "local", "--nproc", "4", TINY, *FAST]) == rc
    err = capsys.readouterr().err
    if rc == 1:
        assert f"rank 1 failed with {remote_type}: boom" in err and "--- traceback from rank 1 ---" in err
    else:
        assert err.strip() == "longctx: error: rank 1: boom"


def _cli(*args, env=None, timeout=300):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "longctx", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout, env=full_env)


def test_a_command_that_dies_on_a_signal_prints_its_python_stack():
    # a rank torchrun starts is `longctx train` in a process of its own: a segfault there (a kernel, gloo) sends no
    # exception anywhere, so main() has faulthandler print where it happened (PYTHONFAULTHANDLER unset here)
    code = ("import ctypes, sys\nfrom longctx.cli import main\nassert main(['info']) == 0\n"
            "def crash_here():\n    ctypes.string_at(0)\ncrash_here()")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONFAULTHANDLER"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert res.returncode == -11, (res.returncode, res.stderr)
    assert "Fatal Python error: Segmentation fault" in res.stderr and "crash_here" in res.stderr, res.stderr


def test_a_reader_that_leaves_early_is_no_traceback():
    """`longctx info | head -1`: the pipe's reader is gone before the output is written (stdout to a pipe is
    block-buffered, so the write fails at the flush): exit 141 (SIGPIPE's), nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "longctx", "info"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd=ROOT)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == "", (proc.returncode, err)


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_in_one_process_writes_metrics_and_config(tmp_path):
    run_dir = tmp_path / "run"
    res = _cli("train", TINY, *FAST, "parallel.cp=1", f"run_dir={run_dir}", "logging.quiet=true")
    assert res.returncode == 0, res.stderr
    records = _metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 for r in records)
    assert records[0]["tokens"] == 2 * 256 and records[0]["mfu"] is None  # CPU: achieved FLOP/s, no MFU
    saved = (run_dir / "config.yaml").read_text()
    assert "seq_len: 256" in saved and f"run_dir: {run_dir}" in saved
    assert "done: 3 steps" in res.stdout


def test_launch_local_runs_every_rank_and_matches_one_process(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    one, four = tmp_path / "one", tmp_path / "four"
    with ThreadPoolExecutor(2) as pool:  # two independent jobs: their start-up overlaps
        a = pool.submit(_cli, "train", TINY, *FAST, "parallel.cp=1", f"run_dir={one}", "logging.quiet=true")
        b = pool.submit(_cli, "launch", "local", "--nproc", "4", TINY, *FAST, "parallel.strategy=striped",
                        f"run_dir={four}", "logging.tensorboard=true")
        a, b = a.result(), b.result()
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    la, lb = [r["loss"] for r in _metrics(one)], [r["loss"] for r in _metrics(four)]
    assert all(abs(x - y) <= 1e-5 * abs(x) for x, y in zip(la, lb)), (la, lb)
    assert "train: 100%" in b.stdout or "train: 100%" in b.stderr  # rank 0's progress bar
    assert "strategy: striped" in b.stdout  # the resolved config, printed once
    assert b.stdout.count("strategy: striped") == 1
    events = list((four / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1 and events[0].stat().st_size > 0  # rank 0 only


def test_a_bench_kernel_that_cannot_take_the_benchs_calls_is_one_line(monkeypatch, capsys):
    """--kernel is asked about the bench's dtype, heads and head width before any rank starts (each rank
    refused it at its first call, with a traceback); the Triton interpreter alone is not availability (its
    CPU calls also need LONGCTX_TRITON_ON_CPU=1: `info` said available, then every call was refused)."""
    import torch

    from longctx import kernels

    ref = kernels.backends()["reference"]
    no_doubles = kernels.Backend("no-doubles", ref.forward, ref.backward, supports=lambda q, k, v, mask: (
        "dtype torch.float64 is not supported" if q.dtype == torch.float64 else None))
    kernels.register(no_doubles, replace=True)
    small = ["--world-size", "2", "--heads", "2", "--head-dim", "4"]
    try:
        for bench in (["attention", "--seq-len", "8", "--strategies", "ring"], ["decode", "--context", "8"],
                      ["dilated", "--seq-len", "8"]):
            assert main(["bench", *bench, *small, "--kernel", "no-doubles", "--dtype", "float64"]) == 2, bench
            assert capsys.readouterr().err == ("longctx: error: --kernel no-doubles cannot run here: dtype "
                                               "torch.float64 is not supported; use --kernel auto\n"), bench
    finally:
        kernels.unregister("no-doubles")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        monkeypatch.delenv("LONGCTX_TRITON_ON_CPU", raising=False)
        assert "with LONGCTX_TRITON_ON_CPU=1" in (kernels.backends()["triton"].availability() or "")  # `info` too
        assert main(["bench", "attention", *small, "--seq-len", "8", "--strategies", "ring", "--kernel", "triton"]) == 2
        assert "with LONGCTX_TRITON_ON_CPU=1" in capsys.readouterr().err


def test_launch_local_with_more_ranks_than_gpus_is_refused_not_run_on_the_cpu(monkeypatch, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert main(["launch", "local", "--nproc", "4", TINY]) == 2
    assert capsys.readouterr().err == (
        "longctx: error: --nproc 4 on a machine with 2 CUDA device(s): each rank needs its own, and without one the "
        "ranks would train on the CPU; use --nproc 2, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to simulate the ranks "
        "on the CPU on purpose\n")


def test_a_kernel_this_machine_cannot_run_is_refused_before_and_inside_the_ranks(capsys):
    """validate_job accepts parallel.kernel=flash (the job may be meant for a GPU cluster); the commands that
    run here refuse it in one line, and so does every rank (torchrun and Ray workers check on their own)."""
    from omegaconf import OmegaConf

    from longctx.config import load
    from longctx.kernels import backends
    from longctx.launch import RankError, run, train_main

    missing = [name for name, b in sorted(backends().items()) if b.availability()]
    if not missing:
        pytest.skip("every kernel backend can run on this machine")
    name = missing[0]
    layout = ["parallel.cp=1", "parallel.dp_shard=-1"]  # (bench train's is its --layouts)
    for argv in (["train", TINY, *layout], ["launch", "local", "--nproc", "2", TINY, *layout],
                 ["bench", "train", "--config", TINY, "--world-size", "2", "--layouts", "cp=2", "--overrides"]):
        assert main([*argv, f"parallel.kernel={name}"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"longctx: error: parallel.kernel={name} cannot run on this machine: "), err
        assert "use parallel.kernel=auto" in err and err.count("\n") == 1
    cfg = load(path=TINY, overrides=[f"parallel.kernel={name}", "train.steps=1", "logging.quiet=true"])
    with pytest.raises(RankError) as info:
        run(train_main, 1, args=(OmegaConf.to_container(cfg),), timeout=120)
    assert info.value.remote_type == "ConfigError" and "cannot run on this machine" in info.value.remote_message


def test_running_out_of_memory_is_one_line_and_other_runtime_errors_are_bugs(monkeypatch, capsys):
    from longctx import cli
    from longctx.launch import RankError

    def oom(args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory: you "
                           "tried to allocate 2048000000000000 bytes.")

    monkeypatch.setattr(cli, "_dispatch", oom)
    assert main(["info"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error: out of memory (") and "ask for less" in err and err.count("\n") == 1

    def rank_oom(args):
        raise RankError("rank 1 failed with OutOfMemoryError: CUDA out of memory", 1, "OutOfMemoryError",
                        "Traceback ...", None, "CUDA out of memory. Tried to allocate 8.00 GiB")

    monkeypatch.setattr(cli, "_dispatch", rank_oom)
    assert main(["info"]) == 2
    assert capsys.readouterr().err.startswith("longctx: error: rank 1 ran out of memory (CUDA out of memory")

    def bug(args):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(cli, "_dispatch", bug)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        main(["info"])


def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys):
    """Ctrl-C is the user stopping the command, not a bug: no traceback (the launcher's cleanup ends its ranks)."""
    import longctx.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_dispatch", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err == "longctx: interrupted\n"


def test_repeated_list_flags_add_up():
    """`--input a --input b` reads both (argparse's nargs keeps only the last repetition by default)."""
    parser = build_parser()
    args = parser.parse_args(["data", "prepare", "--input", "a", "b", "--input", "c", "--output", "o"])
    assert args.input == ["a", "b", "c"]
    args = parser.parse_args(["bench", "train", "--config", TINY, "--layouts", "cp=2", "--layouts", "dp_shard=2",
                              "--overrides", "train.lr=1e-3", "--overrides", "model.dim=32"])
    assert args.layouts == ["cp=2", "dp_shard=2"] and args.overrides == ["train.lr=1e-3", "model.dim=32"]


def test_the_demo_checks_where_it_writes_first(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").write_text("not a directory")
    assert main(["demo", "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'out'} is a file, not a directory" in err, err

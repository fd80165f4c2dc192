"""`longctx eval needle` and `eval ppl` on a checkpoint trained here: one process and two ranks agree."""

import json
import os

import pytest

from longctx.launch import run


def _main_here(argv):
    from longctx.cli import main as cli_main

    return cli_main(argv)


def main(argv):
    """The CLI in a child process: training imports torch._dynamo (and with it triton, compiled) through the
    optimizer, which must not happen in the test process before the interpreted Triton tests run."""
    return run(_main_here, 1, args=(argv,), timeout=300)[0]

PASSKEY = ["model.vocab_size=64", "model.dim=32", "model.n_heads=2", "model.n_kv_heads=2", "model.ffn_dim=64",
           "data.source=passkey", "data.digits=2", "train.seq_len=64", "train.batch_size=2", "train.steps=2",
           "checkpoint.interval=2", "logging.quiet=true", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def passkey_checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("passkey")
    assert main(["train", "configs/tiny.yaml", *PASSKEY, "parallel.cp=1", f"run_dir={run_dir}"]) == 0
    return str(run_dir / "checkpoints")


def test_needle_eval_writes_json_and_heatmap_and_ranks_agree(passkey_checkpoint, tmp_path):
    outs = {}
    for nproc, tp in ((1, 1), (2, 1), (2, 2)):  # one process; two context ranks; the model split over two ranks
        js, png = tmp_path / f"n{nproc}tp{tp}.json", tmp_path / f"n{nproc}tp{tp}.png"
        assert main(["eval", "needle", "--checkpoint", passkey_checkpoint, "--lengths", "48,64", "--depths", "0,1",
                     "--samples", "3", "--nproc", str(nproc), "--tp", str(tp), "--json", str(js),
                     "--plot", str(png)]) == 0
        outs[nproc, tp] = json.loads(js.read_text())
        assert os.path.getsize(png) > 1000
    one = outs[1, 1]
    assert [(r["length"], r["depth"]) for r in one] == [(48, 0.0), (48, 1.0), (64, 0.0), (64, 1.0)]
    assert all(set(r) >= {"length", "depth", "accuracy"} and 0 <= r["accuracy"] <= 1 for r in one)
    for key in ((2, 1), (2, 2)):
        assert [r["correct"] for r in one] == [r["correct"] for r in outs[key]], key  # the same greedy answers


def test_needle_eval_bad_input_is_one_line(passkey_checkpoint):
    import subprocess
    import sys

    def cli(*argv):
        return subprocess.run([sys.executable, "-m", "longctx", *argv], capture_output=True, text=True, timeout=120)

    r = cli("eval", "needle", "--checkpoint", passkey_checkpoint, "--lengths", "8", "--depths", "0")
    assert r.returncode == 2 and "too short" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = cli("eval", "needle", "--checkpoint", "/nonexistent", "--lengths", "64")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = cli("eval", "needle", "--checkpoint", passkey_checkpoint, "--lengths", "64", "--depths", "2")
    assert r.returncode == 2 and "between 0 and 1" in r.stderr and r.stderr.startswith("longctx: error:")
    for argv, message in [(["--nproc", "4", "--tp", "3"], "--tp 3 does not divide --nproc 4"),
                          (["--nproc", "4", "--tp", "4"], "--tp 4 does not fit this checkpoint's model: "
                                                          "model.n_heads=2 is not divisible by parallel.tp=4")]:
        r = cli("eval", "needle", "--checkpoint", passkey_checkpoint, "--lengths", "64", *argv)
        assert r.returncode == 2 and message in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_perplexity_by_position_agrees_across_ranks(tmp_path, capsys):
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "abcdefghij" * (i + 3)}) + "\n" for i in range(40)))
    assert main(["data", "prepare", "--input", str(corpus), "--output", str(tmp_path / "ds"), "--quiet"]) == 0
    run_dir = tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", "parallel.cp=1", "model.vocab_size=258", "data.source=tokens",
                 f"data.path={tmp_path / 'ds'}", "train.seq_len=64", "train.batch_size=2", "train.steps=2",
                 "checkpoint.interval=2", "logging.quiet=true", "logging.tensorboard=false", f"run_dir={run_dir}"]) == 0
    got = {}
    for nproc, tp in ((1, 1), (2, 1), (4, 2)):  # (4, 2): two context ranks, each a pair of tensor-parallel ranks
        js = tmp_path / f"p{nproc}tp{tp}.json"
        assert main(["eval", "ppl", "--checkpoint", str(run_dir / "checkpoints"), "--buckets", "4", "--sequences", "6",
                     "--nproc", str(nproc), "--tp", str(tp), "--json", str(js)]) == 0
        got[nproc, tp] = json.loads(js.read_text())
    one = got[1, 1]
    assert one[0]["tokens"] > 0
    for key in ((2, 1), (4, 2)):
        assert [r["tokens"] for r in one] == [r["tokens"] for r in got[key]], key
        for a, b in zip(one, got[key]):
            assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"]), (key, a, b)
    # bad input is one line, found in this process before any rank starts (nothing here imports the optimizer)
    ck = str(run_dir / "checkpoints")
    for argv, message in [
        (["--data", str(tmp_path / "nope"), "--nproc", "2"], f"--data='{tmp_path / 'nope'}' is not a prepared dataset"),
        (["--nproc", "3", "--seq-len", "100"], "--seq-len 100 is not divisible by 6"),
        (["--seq-len", "4", "--buckets", "8"], "--seq-len at least the bucket count"),
        (["--nproc", "2", "--tp", "2", "--seq-len", "63", "--buckets", "4"], "use a multiple of 2"),
    ]:
        assert _main_here(["eval", "ppl", "--checkpoint", ck, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longctx: error:") and message in err and err.count("\n") == 1, err


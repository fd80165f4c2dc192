"""`longctx eval needle` and `eval ppl` on a checkpoint trained here: one process and two ranks agree."""

import json
import math
import os
import shutil

import pytest

from longctx.launch import run
from tests.support.cli import main
from tests.support.cli import main_here as _main_here
from tests.support.perplexity import assert_same_ppl, ppl_by_layout

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
    for nproc, tp in ((1, 1), (2, 2)):  # one process; the model split over two ranks (cp x tp: tests/model)
        js, png = tmp_path / f"n{nproc}tp{tp}.json", tmp_path / f"n{nproc}tp{tp}.png"
        assert main(["eval", "needle", "--checkpoint", passkey_checkpoint, "--lengths", "48,64", "--depths", "0,1",
                     "--samples", "3", "--nproc", str(nproc), "--tp", str(tp), "--json", str(js),
                     "--plot", str(png)]) == 0
        outs[nproc, tp] = json.loads(js.read_text())
        assert os.path.getsize(png) > 1000
    one = outs[1, 1]
    assert [(r["length"], r["depth"]) for r in one] == [(48, 0.0), (48, 1.0), (64, 0.0), (64, 1.0)]
    assert all(set(r) >= {"length", "depth", "accuracy"} and 0 <= r["accuracy"] <= 1 for r in one)
    assert [r["correct"] for r in one] == [r["correct"] for r in outs[2, 2]]  # the same greedy answers


def _loaded_by_each_rank(checkpoints: list[str]) -> float:
    """Rank r evaluates `checkpoints[r]` (as if each rank's command had located a root itself): the sum of the
    weights it loaded."""
    import torch.distributed as dist

    from longctx.launch.entry import _eval_model

    model, _, _ = _eval_model({"checkpoint": checkpoints[dist.get_rank()], "tp": 1, "strategy": "zigzag"},
                              log=lambda *a, **k: None)
    return sum(float(p.double().sum()) for p in model.parameters())


def test_every_rank_evaluates_the_checkpoint_the_command_checked(tmp_path, monkeypatch, capsys):
    """A checkpoint root's newest changes while a run still trains into it: the command locates it once, checks
    that one and hands it to the ranks (they located the root again, each for itself), and ranks that located
    different ones (torchrun: each rank runs the command) load rank 0's."""
    import longctx.cli_data as cli_data

    run_dir = tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", *PASSKEY, "checkpoint.interval=1", "parallel.cp=1",
                 f"run_dir={run_dir}"]) == 0
    root = str(run_dir / "checkpoints")
    first, newest = (os.path.join(root, step) for step in ("step_00000001", "step_00000002"))
    handed = []
    monkeypatch.setattr(cli_data, "_on_ranks", lambda kind, params, nproc: handed.append(params["checkpoint"]) or [])
    for command in (["generate", "--ids", "3"], ["eval", "needle", "--lengths", "48", "--depths", "0"]):
        assert _main_here([*command, "--checkpoint", root, "--nproc", "2"]) == 0
    assert handed == [newest, newest]
    sums = run(_loaded_by_each_rank, 2, args=([newest, first],))
    again = run(_loaded_by_each_rank, 2, args=([first, first],))[0]
    assert sums[0] == sums[1] != again  # rank 0's, on both; and the two checkpoints differ


def test_checkpoints_evaluation_cannot_take_are_refused_by_what_they_are(passkey_checkpoint, tmp_path, capsys):
    """A model with dilated (LongNet) layers: every eval command and generate refuse it in one line (it was a
    rank's traceback: generate's causal-only check, or DilatedAttention given documents=). A vocabulary too
    small for the needle task is the model's, not a --lengths problem."""
    import hashlib

    import yaml

    def edited(name, **model):
        step = sorted(os.listdir(passkey_checkpoint))[-1]
        copy = tmp_path / name / step
        shutil.copytree(os.path.join(passkey_checkpoint, step), copy)
        cfg = yaml.safe_load((copy / "config.yaml").read_text())
        cfg["model"].update(model)
        (copy / "config.yaml").write_text(yaml.safe_dump(cfg))
        marker = json.loads((copy / "COMPLETE").read_text())  # sealed again, as if it had been trained so
        data = (copy / "config.yaml").read_bytes()
        marker["files"]["config.yaml"], marker["sha256"]["config.yaml"] = len(data), hashlib.sha256(data).hexdigest()
        (copy / "COMPLETE").write_text(json.dumps(marker))
        return str(tmp_path / name)

    dilated = edited("dilated", dilated={"layers": [0], "w0": 16, "alpha": 2})
    for argv in (["generate", "--ids", "3,5"], ["eval", "needle", "--lengths", "64"],
                 ["eval", "ppl", "--data", "/nonexistent"]):
        assert _main_here([*argv, "--checkpoint", dilated]) == 2
        err = capsys.readouterr().err
        assert err == ("longctx: error: this checkpoint's model has dilated (LongNet) attention layers "
                       "(model.dilated.layers=[0]), which generation and evaluation do not run; `longctx checkpoint "
                       "export` still gives its weights\n"), err
    small = edited("small", vocab_size=20)
    assert _main_here(["eval", "needle", "--checkpoint", small, "--lengths", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error: this checkpoint's model cannot take the retrieval task at any --lengths: "
                          "model.vocab_size=20 is too small"), err


def test_needle_eval_bad_input_is_one_line(passkey_checkpoint, capsys):
    import subprocess
    import sys

    # the real command once (its stderr is one line); the rest in this process, checked before any rank starts
    r = subprocess.run([sys.executable, "-m", "longctx", "eval", "needle", "--checkpoint", passkey_checkpoint,
                        "--lengths", "8", "--depths", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "too short" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    for argv, message in [
        (["--checkpoint", "/nonexistent", "--lengths", "64"], "does not exist"),
        (["--checkpoint", passkey_checkpoint, "--lengths", "64", "--depths", "2"], "between 0 and 1"),
        (["--checkpoint", passkey_checkpoint, "--lengths", "64", "--nproc", "4", "--tp", "3"],
         "--tp 3 does not divide --nproc 4"),
        (["--checkpoint", passkey_checkpoint, "--lengths", "64", "--nproc", "4", "--tp", "4"],
         "--tp 4 does not fit this checkpoint's model: model.n_heads=2 is not divisible by --tp 4; choose --tp 2"),
        (["--checkpoint", passkey_checkpoint, "--lengths", "64", "--nproc", "3", "--strategy", "ulysses"],
         "ulysses: 2 query heads do not divide over 3 ranks"),
        (["--checkpoint", passkey_checkpoint, "--lengths", "64", "--plot", "heat.bmp"],
         "--plot heat.bmp: matplotlib cannot write .bmp files"),
        (["--checkpoint", passkey_checkpoint, "--lengths", "64", "--json", "n.png", "--plot", "./n.png"],
         "--json n.png and --plot ./n.png name the same file (./n.png): the plot would overwrite the records"),
        (["--checkpoint", passkey_checkpoint, "--lengths", "64", "--json", "n.png", "--plot", "n"],
         "--json n.png and --plot n name the same file (n.png)"),  # savefig adds .png
        # far beyond any machine: refused before a rank starts, not killed by the kernel's OOM killer
        (["--checkpoint", passkey_checkpoint, "--lengths", "1000000000000"],
         "--lengths 1000000000000 needs at least "),
    ]:
        assert _main_here(["eval", "needle", *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longctx: error:") and message in err and err.count("\n") == 1, err


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    """A run trained on a prepared (byte-tokenized) text dataset: (its run directory, the dataset)."""
    tmp_path = tmp_path_factory.mktemp("text")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": "abcdefghij" * (i + 3)}) + "\n" for i in range(40)))
    assert main(["data", "prepare", "--input", str(corpus), "--output", str(tmp_path / "ds"), "--quiet"]) == 0
    run_dir = tmp_path / "run"
    assert main(["train", "configs/tiny.yaml", "parallel.cp=1", "model.vocab_size=258", "data.source=tokens",
                 f"data.path={tmp_path / 'ds'}", "train.seq_len=64", "train.batch_size=2", "train.steps=2",
                 "checkpoint.interval=2", "logging.quiet=true", "logging.tensorboard=false", f"run_dir={run_dir}"]) == 0
    return run_dir, tmp_path / "ds"


def test_perplexity_by_position_agrees_across_ranks(text_run, tmp_path, capsys):
    from longctx.eval.ppl import format_ppl

    run_dir, _ = text_run
    # (4, 2): two context ranks, each a pair of tensor-parallel ranks
    got = ppl_by_layout(main, str(run_dir / "checkpoints"), tmp_path, ((1, 1), (4, 2)), "--buckets", "4",
                        "--sequences", "6")
    assert_same_ppl(got[1, 1], got[4, 2])
    # bad input is one line, found in this process before any rank starts (nothing here imports the optimizer)
    ck = str(run_dir / "checkpoints")
    other = tmp_path / "other_tokenizer"  # the same ids, as if another tokenizer had made them
    shutil.copytree(text_run[1], other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(dict(meta, tokenizer="tokenizer.json", tokenizer_sha256="0" * 64)))
    for argv, message in [
        (["--data", str(other)], f"--data '{other}' was tokenized with 'tokenizer.json', the checkpoint's training "
                                 "data"),
        (["--data", str(tmp_path / "nope"), "--nproc", "2"], f"--data='{tmp_path / 'nope'}' is not a prepared dataset"),
        (["--nproc", "3", "--seq-len", "100"], "--seq-len 100 is not divisible by 6"),
        (["--seq-len", "4", "--buckets", "8"], "--buckets 8 is more than the 4 positions of a sequence (--seq-len)"),
        (["--data", ""], "--data is empty: give a dataset made by `longctx data prepare`"),
        (["--nproc", "2", "--tp", "2", "--seq-len", "63", "--buckets", "4"], "use a multiple of 2"),
        (["--sequences", "100000"], "--sequences 100000: the dataset has"),
    ]:
        assert _main_here(["eval", "ppl", "--checkpoint", ck, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longctx: error:") and message in err and err.count("\n") == 1, err
    # windows longer than any document: the far buckets hold no token; null in JSON, named in the table
    js = tmp_path / "not_yet" / "long.json"  # its directory is made, as every --json's is
    assert main(["eval", "ppl", "--checkpoint", ck, "--seq-len", "1024", "--buckets", "4", "--sequences", "1",
                 "--json", str(js)]) == 0
    records = json.loads(js.read_text())
    assert records[0]["tokens"] > 0 and records[0]["loss"] > 0
    assert [(r["tokens"], r["loss"], r["ppl"]) for r in records[2:]] == [(0, None, None)] * 2
    table = format_ppl(records)
    assert "no tokens" in table and "no document read has a labelled token past position" in table
    # buckets that do not divide the length: contiguous, none past it (a fixed width ceil(L/B) left the last
    # ones starting beyond the window)
    assert main(["eval", "ppl", "--checkpoint", ck, "--seq-len", "64", "--buckets", "5", "--sequences", "2",
                 "--json", str(js)]) == 0
    spans = [(r["bucket_start"], r["bucket_end"]) for r in json.loads(js.read_text())]
    assert spans == [(0, 13), (13, 26), (26, 39), (39, 52), (52, 64)]


def test_a_diverged_runs_perplexity_is_capped_as_validation_caps_it():
    import torch

    from longctx.eval.ppl import bucket_records, format_ppl

    sums, counts = torch.tensor([27720.0, 0.0, 5.0], dtype=torch.float64), torch.tensor([10.0, 0.0, 2.0])
    records = bucket_records(sums, counts, [0, 4, 8, 12])
    assert [(r["loss"], r["ppl"]) for r in records] == [(2772.0, math.exp(700)), (None, None), (2.5, math.exp(2.5))]
    assert "loss 2772.0000" in format_ppl(records)
    json.dumps(records)  # an evaluation's JSON is written after its table


def _ppl_twice(checkpoint, data):
    from longctx.eval import load_checkpoint_model
    from longctx.eval.ppl import perplexity_by_position
    from longctx.model.llama import LocalAttention

    model, _ = load_checkpoint_model(checkpoint, log=lambda *a: None)
    runs = [perplexity_by_position(model, data, seq_len=64, sequences=2, buckets=2, first=first, strategy=strategy)
            for first, strategy in ((0, "zigzag"), (2, "ring"), (0, "zigzag"))]
    return runs, all(isinstance(layer.attention.core, LocalAttention) for layer in model.layers)


def test_perplexity_by_position_hands_the_model_back_as_it_came(text_run):
    """Evaluated again on other windows, with another strategy, on the same 2 ranks: each call's context
    parallelism is undone after it (the second call found no cores to swap: 'already applied?')."""
    run_dir, data = text_run
    (one, restored_one), (two, restored_two) = run(_ppl_twice, 2, args=(str(run_dir / "checkpoints"), str(data)),
                                                   timeout=300)
    alone, _ = run(_ppl_twice, 1, args=(str(run_dir / "checkpoints"), str(data)), timeout=300)[0]
    assert restored_one and restored_two and one == two
    for by_ranks, by_one in zip(one, alone):
        assert_same_ppl(by_one, by_ranks)
    assert one[0] == one[2] and one[0] != one[1]


def test_eval_ppl_reads_what_the_run_held_out(text_run, tmp_path):
    """Without --data: validation.path, or data.path from the first window wholly past the last token training
    read (the last validation.holdout windows of train.seq_len), whatever --seq-len; else data.path, said."""
    from longctx.config import load
    from longctx.data.tokens import read_meta
    from longctx.eval.ppl import held_out

    _, ds = text_run
    cfg = load(path="configs/tiny.yaml", overrides=["data.source=tokens", f"data.path={ds}", "train.seq_len=64",
                                                    "validation.holdout=2", "validation.interval=1",
                                                    "model.vocab_size=258"])  # as the run trained on it
    n_tokens = int(read_meta(str(ds))["tokens"])
    training_ends = (math.ceil((n_tokens - 1) / 64) - 2) * 64  # the first held-out token
    for seq_len in (64, 48, 100):
        path, first, what = held_out(cfg, seq_len)
        assert path == str(ds) and "held out of training" in what
        assert first * seq_len >= training_ends > (first - 1) * seq_len, (seq_len, first)
    moved = load(path="configs/tiny.yaml", overrides=["data.source=tokens", "data.path=/gone", "validation.holdout=2",
                                                      "validation.interval=1"])
    with pytest.raises(ValueError, match=r"the checkpoint's data.path='/gone' is not a prepared dataset .* --data"):
        held_out(moved, 64)  # a ValueError: one line on the command line
    moved.data.path = "gone"
    with pytest.raises(ValueError, match=r"data.path='gone' is not a prepared dataset .*\(a relative path, read from "
                                         r"the current directory, .*: run from where it trained\); or pass held-out"):
        held_out(moved, 64)
    # the checkpoint's record of its dataset: the same one reads as before; one prepared again since is refused
    from longctx.cli_data import _same_tokenizer
    from longctx.data.tokens import identity

    recorded = identity(read_meta(str(ds)))
    assert held_out(cfg, 64, recorded) == held_out(cfg, 64)
    with pytest.raises(ValueError, match=rf"data.path {ds} was prepared again since it trained on it \(tokens "
                                         rf"{n_tokens + 10} -> {n_tokens}\): its last windows are not the ones held "
                                         "out of training; pass held-out text with --data"):
        held_out(cfg, 64, dict(recorded, tokens=n_tokens + 10))
    # --data against the recorded tokenizer, wherever the training data is now (a relative data.path read from
    # elsewhere, or moved): a dataset of another tokenizer is refused, one of the same passes
    other = tmp_path / "other"
    shutil.copytree(ds, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps(dict(meta, tokenizer="tok.json", tokenizer_sha256="0" * 64)))
    with pytest.raises(ValueError, match=rf"--data '{other}' was tokenized with 'tok.json', the checkpoint's training "
                                         r"data \(/gone\) with 'byte'"):
        _same_tokenizer(str(other), "/gone", recorded)
    _same_tokenizer(str(ds), "/gone", recorded)
    _same_tokenizer(str(other), "/gone", None)  # nothing recorded and nothing there: nothing to compare
    cfg.validation.holdout, cfg.validation.path = 0, "/elsewhere"
    assert held_out(cfg, 64) == ("/elsewhere", 0, "validation.path /elsewhere (the run's held-out documents)")
    cfg.validation.path = None
    assert "which this model trained on" in held_out(cfg, 64)[2]



def test_generate_continues_text_prompts_the_same_on_any_layout(text_run, tmp_path):
    """`longctx generate` with the tokenizer the checkpoint's dataset was made with: one process and the model
    split over two tensor-parallel ranks give the same greedy continuation (cp x tp: tests/model)."""
    run_dir, _ = text_run
    got = {}
    for nproc, tp in ((1, 1), (2, 2)):
        js = tmp_path / f"g{nproc}tp{tp}.json"
        assert main(["generate", "--checkpoint", str(run_dir / "checkpoints"), "--prompt", "abcdefghijabc",
                     "--ids", "97,98,99", "--prompt", "abcd", "--max-new-tokens", "6", "--nproc", str(nproc),
                     "--tp", str(tp), "--json", str(js)]) == 0
        got[nproc, tp] = json.loads(js.read_text())
    one = got[1, 1]
    # the rows in the command line's order, --prompt and --ids mixed
    assert [r["prompt_ids"] for r in one] == [list(b"abcdefghijabc"), [97, 98, 99], list(b"abcd")], one
    assert [len(r["ids"]) for r in one] == [6, 6, 6]
    assert all(r["text"] == bytes(i for i in r["ids"] if i < 256).decode("utf-8", "replace") for r in one)
    assert [r["ids"] for r in got[2, 2]] == [r["ids"] for r in one]


def test_generate_takes_token_ids_and_refuses_bad_prompts(passkey_checkpoint, tmp_path, capsys, monkeypatch):
    js = tmp_path / "ids.json"
    assert main(["generate", "--checkpoint", passkey_checkpoint, "--ids", "3,5,7,9", "--max-new-tokens", "3",
                 "--json", str(js)]) == 0
    [record] = json.loads(js.read_text())
    assert record["prompt_ids"] == [3, 5, 7, 9] and len(record["ids"]) == 3 and record["text"] is None
    for argv, message in [
        ([], "nothing to continue"),
        (["--prompt", "hello"], "no tokenizer recorded); give its token ids with --ids, or --tokenizer with a "
                                "tokenizer.json of at most 64 ids"),
        (["--ids", "3,64"], "prompt 0 has token id 64, outside the model's vocabulary 0..63"),
        (["--ids", "3", "--temperature", "-1"], "--temperature -1.0: must be a finite number >= 0"),
        (["--ids", "3", "--temperature", "nan"], "--temperature nan: must be a finite number >= 0"),
        (["--ids", "3", "--top-k", "65", "--temperature", "1"], "--top-k 65: must be between 1 and the model's "
                                                                 "vocabulary size 64"),
        (["--ids", "3", "--top-k", "5"], "--top-k 5 samples among the k likeliest tokens, but --temperature 0"),
        (["--ids", "3", "--seed", "7"], "--seed 7 seeds sampling, but --temperature 0 (the default) is greedy"),
        (["--ids", "3,,5"], "--ids: '3,,5' is not a comma-separated list of integers"),
        (["--ids", "3", "--max-new-tokens", "1000000000000"], "a 1-token prompt + --max-new-tokens 1000000000000 "
                                                                "needs at least"),
        (["--ids", "3", "--json", str(tmp_path)], f"--json {tmp_path} is a directory; give a file path"),
        (["--ids", "3", "--json", os.path.join(__file__, "x.json")], f"{__file__} is a file, not a directory"),
        (["--ids", "3", "--nproc", "2", "--tp", "4"], "--tp 4 does not divide --nproc 2"),
        (["--ids", "3", "--strategy", "hybrid"], "--strategy hybrid needs a (ring, ulysses) mesh"),
        (["--prompt", "hello", "--tokenizer", "byte"], "the tokenizer (byte) has 258 ids but the model has "
                                                         "model.vocab_size=64"),
    ]:
        assert _main_here(["generate", "--checkpoint", passkey_checkpoint, *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("longctx: error:") and message in err and err.count("\n") == 1, err
    monkeypatch.setenv("RANK", "0")  # under torchrun the world size counts, not --nproc
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert _main_here(["generate", "--checkpoint", passkey_checkpoint, "--ids", "3", "--tp", "3"]) == 2
    assert "--tp 3 does not divide torchrun's world size 4" in capsys.readouterr().err


def test_the_checkpoint_tokenizer_is_the_one_its_data_was_made_with(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs `tokenizers` (extra: hf)")
    from tokenizers import models, pre_tokenizers

    from longctx.config import load
    from longctx.data.prepare import prepare
    from longctx.eval.weights import checkpoint_tokenizer

    tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "</s>": 1, "long": 2, "context": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "long context"}) + "\n")
    prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "ds"), tokenizer=str(tmp_path / "tokenizer.json"),
            progress=False)
    cfg = load(overrides=["data.source=tokens", f"data.path={tmp_path / 'ds'}", "model.vocab_size=8"])
    found = checkpoint_tokenizer(cfg)
    assert found.encode("long context") == [2, 3] and found.eos_id == 1
    with pytest.raises(ValueError, match="the tokenizer \\(byte\\) has 258 ids but the model has model.vocab_size=8"):
        checkpoint_tokenizer(cfg, "byte")
    assert checkpoint_tokenizer(load(overrides=["data.source=synthetic"])) is None  # token ids, not text
    tok.add_tokens(["extra"])
    tok.save(str(tmp_path / "tokenizer.json"))  # changed after the dataset was made
    with pytest.raises(ValueError, match="has changed since .* was made with it"):
        checkpoint_tokenizer(cfg)
    os.remove(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match="which is not there any more; pass --tokenizer"):
        checkpoint_tokenizer(cfg)
    # a meta.json that names no tokenizer, or is damaged: one line naming the file and the fix, not a KeyError
    meta_path = tmp_path / "ds" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "tokenizer"}))
    with pytest.raises(ValueError, match=r"ds: meta.json names no tokenizer .*pass the tokenizer the model was "
                                         r"trained with as --tokenizer"):
        checkpoint_tokenizer(cfg)
    for damaged, said in (("[1]", "meta.json holds a list"), ("{", "meta.json is not valid JSON")):
        meta_path.write_text(damaged)
        with pytest.raises(ValueError, match=rf"the checkpoint's data.path='.*ds': {said}.*prepare the dataset again"):
            checkpoint_tokenizer(cfg)
    # the dataset itself gone (or a relative data.path read from elsewhere): not "no tokenizer recorded"
    shutil.rmtree(tmp_path / "ds")
    with pytest.raises(ValueError, match=r"the checkpoint's dataset data.path='.*ds', whose meta.json names the "
                                         r"tokenizer the model was trained with, is not there .*pass that tokenizer"):
        checkpoint_tokenizer(cfg)


def test_a_tp_that_does_not_fit_names_the_tp_values_that_do():
    """A trained model's sizes are fixed: the refusal states the misfit with --tp, then the degrees that fit."""
    from omegaconf import OmegaConf

    from longctx.config import load
    from longctx.eval.weights import check_eval_tp

    def cfg(**model):
        c = load(overrides=[f"model.{k}={v}" for k, v in model.items() if k != "hf_path"])
        if "hf_path" in model:  # its sizes are already resolved into the model section
            OmegaConf.update(c, "model.hf_path", model["hf_path"], force_add=True)
        return c

    for model, tp, message in [
        (dict(n_heads=8, n_kv_heads=2, vocab_size=64, ffn_dim=96), 4, None),  # tp 4 shares each K/V head by 2
        (dict(n_heads=8, n_kv_heads=2, vocab_size=64, ffn_dim=100), 8,
         "--tp 8 does not fit this checkpoint's model: model.ffn_dim=100 is not divisible by --tp 8; choose --tp 2, 4 "
         "or 1"),
        (dict(n_heads=12, n_kv_heads=4, vocab_size=96, dim=96, ffn_dim=96), 8,
         "model.n_heads=12 is not divisible by --tp 8; choose --tp 2, 4, 12 or 1"),
        (dict(n_heads=12, n_kv_heads=4, vocab_size=96, dim=96, ffn_dim=96), 6,
         "model.n_kv_heads=4 and --tp 6 do not divide one another; choose --tp 2, 4, 12 or 1"),
        (dict(n_heads=8, n_kv_heads=8, vocab_size=65, ffn_dim=64), 2,
         "model.vocab_size=65 is not divisible by --tp 2; choose --tp 1 (no tensor-parallel split fits its sizes)"),
        (dict(n_heads=8, n_kv_heads=2, vocab_size=64, ffn_dim=64, hf_path="/some/hf"), 4,
         "the model's 2 K/V heads (model.hf_path) do not split evenly over --tp 4; choose --tp 2 or 1"),
    ]:
        if message is None:
            check_eval_tp(cfg(**model), tp)
            continue
        with pytest.raises(ValueError) as e:
            check_eval_tp(cfg(**model), tp)
        assert message in str(e.value), (str(e.value), message)

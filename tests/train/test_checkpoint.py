"""Checkpoint and resume with DCP: a stopped and resumed run is the uninterrupted run bit for bit (same
layout) or within 1e-5 (another layout or world size); a checkpoint whose write did not finish is never
loaded; export gives a plain state dict the unparallelised model loads."""

import json
import os
import re
import shutil
import stat

import pytest
import torch

from longctx.config import ConfigError, from_dict, load
from longctx.launch import run
from longctx.launch.local import RankError
from longctx.model import build_model
from longctx.train import checkpoint, checkpoint_dirs, checkpoint_read, validate_job, weights

from ._workers import (
    config,
    resume_errors,
    resumed_batch,
    save_with_a_file_unread,
    tp_pieces,
    train_and_collect,
    train_and_print,
    train_into_a_held_root,
)

CP2 = ["parallel.cp=2", "parallel.dp_shard=1"]


def _run(world, *configs, stop_after=None, fn=None):
    if fn is not None:
        return run(fn, world, args=configs, timeout=300)
    return run(train_and_collect, world, args=(list(configs), stop_after), timeout=300)


def _same(a, b):
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_and_resume_is_bit_for_bit(tmp_path):
    full = _run(2, config(*CP2, run_dir=str(tmp_path / "full")))[0][0]
    run_dir = str(tmp_path / "stopped")
    first = _run(2, config(*CP2, "checkpoint.interval=2", run_dir=run_dir), stop_after=3)[0][0]
    # interval 2 saves step 2, and the end of the run (step 3) is always kept
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000002", "step_00000003"]
    assert first["checkpoint"].endswith("step_00000003") and first["losses"] == full["losses"][:3]
    resumed = _run(2, config(*CP2, "train.resume=auto", run_dir=run_dir))[0][0]
    assert resumed["resumed_from"].endswith("step_00000003") and resumed["steps"] == [4, 5]
    assert resumed["losses"] == full["losses"][3:]  # bit for bit
    assert _same(resumed["params"], full["params"])
    # the resumed run appended to the same metrics.jsonl with the true step numbers
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [int(line.split('"step": ')[1].split(",")[0]) for line in f] == [1, 2, 3, 4, 5]
    # resumed at or past train.steps: no step, and the checkpoint it found is left as it was, not written again
    newest = os.path.join(run_dir, "checkpoints", "step_00000003")  # (the resumed run wrote none)
    before = {name: os.stat(os.path.join(newest, name)).st_mtime_ns for name in os.listdir(newest)}
    again = _run(2, config(*CP2, "train.steps=2", "checkpoint.interval=2", "train.resume=auto", run_dir=run_dir))[0][0]
    assert again["steps"] == [] and again["resumed_from"] == newest
    assert {name: os.stat(os.path.join(newest, name)).st_mtime_ns for name in os.listdir(newest)} == before


def test_async_save_gives_the_same_checkpoint(tmp_path):
    sync = _run(2, config(*CP2, "checkpoint.interval=2", run_dir=str(tmp_path / "sync")), stop_after=4)[0][0]
    run_dir = str(tmp_path / "async")
    asyn = _run(2, config(*CP2, "checkpoint.interval=2", "checkpoint.async_save=true", run_dir=run_dir),
                stop_after=4)[0][0]
    assert asyn["losses"] == sync["losses"] and asyn["checkpoint"].endswith("step_00000004")
    assert sorted(os.listdir(os.path.join(run_dir, "checkpoints"))) == ["step_00000002", "step_00000004"]
    a = weights.export(os.path.join(run_dir, "checkpoints"), str(tmp_path / "a.pt"))
    b = weights.export(os.path.join(str(tmp_path / "sync"), "checkpoints"), str(tmp_path / "b.pt"))
    assert _same(a, b)


def test_resume_on_another_layout_and_world_size(tmp_path):
    run_dir = str(tmp_path / "cp4")
    full = _run(4, config("parallel.cp=4", "parallel.dp_shard=1", run_dir=run_dir))[0][0]
    _run(4, config("parallel.cp=4", "parallel.dp_shard=1", "checkpoint.interval=3", run_dir=str(tmp_path / "part")),
         stop_after=3)
    ckpt = str(tmp_path / "part" / "checkpoints" / "step_00000003")
    hsdp_tp = ["parallel.tp=2", "parallel.dp_replicate=2", "parallel.dp_shard=1", "parallel.cp=1"]  # 3-D DTensors
    for i, (world, layout) in enumerate(((4, hsdp_tp), (2, CP2))):
        got = _run(world, config(*layout, f"train.resume={ckpt}", run_dir=str(tmp_path / f"r{i}")))[0][0]
        assert got["steps"] == [4, 5]
        for a, b in zip(got["losses"], full["losses"][3:]):
            assert abs(a - b) <= 1e-5 * abs(b), (world, layout, a, b)
        worst = max((got["params"][k] - full["params"][k]).abs().max().item() for k in full["params"])
        assert worst <= 1e-5, (world, layout, worst)


def test_pipeline_checkpoints_resume_on_any_pipeline_layout(tmp_path):
    """Saved names carry no stage index (stages keep their layers' global names) and the optimizer state
    is keyed per parameter: a pp=2 run resumes bit for bit, and its checkpoint resumes without a pipeline;
    a checkpoint without one resumes as V-shaped stages (two per rank)."""
    four = ["model.n_layers=4"]
    pp2 = [*four, "parallel.pp=2", "parallel.dp_shard=1"]
    full = _run(2, config(*pp2, run_dir=str(tmp_path / "full")))[0][0]
    _run(2, config(*pp2, "checkpoint.interval=3", run_dir=str(tmp_path / "pp2")), stop_after=3)
    resumed = _run(2, config(*pp2, "train.resume=auto", run_dir=str(tmp_path / "pp2")))[0][0]
    assert resumed["steps"] == [4, 5] and resumed["losses"] == full["losses"][3:]  # bit for bit
    assert _same(resumed["params"], full["params"])
    _run(1, config(*four, "checkpoint.interval=3", run_dir=str(tmp_path / "one")), stop_after=3)
    resumes = [(1, [*four], tmp_path / "pp2"), (2, [*pp2, "parallel.pp_schedule=zbv"], tmp_path / "one")]
    for i, (world, layout, written) in enumerate(resumes):
        ckpt = str(written / "checkpoints" / "step_00000003")
        got = _run(world, config(*layout, f"train.resume={ckpt}", run_dir=str(tmp_path / f"r{i}")))[0][0]
        assert got["steps"] == [4, 5]
        for a, b in zip(got["losses"], full["losses"][3:]):
            assert abs(a - b) <= 1e-5 * abs(b), (layout, a, b)
        worst = max((got["params"][k] - full["params"][k]).abs().max().item() for k in full["params"])
        assert worst <= 1e-5, (layout, worst)


def test_a_resume_with_another_batch_size_reads_on(tmp_path):
    """Data position = sequences consumed: 2 steps of 4 sequences, then batches of 8 from sequence 8 (step x
    new batch size would skip to 16); a run resumed with its own batch size is unchanged."""
    run_dir = str(tmp_path / "run")
    _run(1, config("train.steps=2", "checkpoint.interval=2", run_dir=run_dir))
    ckpt = os.path.join(run_dir, "checkpoints", "step_00000002")
    wider, same = run(resumed_batch, 1, args=([config("train.batch_size=8", "train.steps=3", f"train.resume={ckpt}",
                                                      "checkpoint.interval=3", run_dir=str(tmp_path / "wide")),
                                               config("train.steps=3", f"train.resume={ckpt}",
                                                      run_dir=str(tmp_path / "same"))],), timeout=300)[0]
    assert wider == {"step": 2, "first_sequence": 8, "reads_on": True}
    assert same == {"step": 2, "first_sequence": 8, "reads_on": True}
    # the wider run's checkpoint records 8 + 8 sequences: its own resume reads on from 16
    again = run(resumed_batch, 1, args=([config("train.batch_size=8", "train.steps=4", "train.resume=auto",
                                                run_dir=str(tmp_path / "wide"))],), timeout=300)[0][0]
    assert again == {"step": 3, "first_sequence": 16, "reads_on": True}


def test_a_resume_takes_this_runs_optimizer_settings_and_schedule(tmp_path):
    """The checkpoint restores the optimizer's moments and step, not the settings of the run that saved it: a
    resume with a lower lr, other betas and weight decay and more steps trains its steps 3-5 at the lrs and
    with the settings of a run started with them (the schedule of 5 steps, not the saved 2-step one's floor),
    and says what changed (a linear decay over the last 2 steps where the checkpoint's run had a cosine)."""
    first = str(tmp_path / "first")
    _run(1, config("train.steps=2", "checkpoint.interval=2", run_dir=first))
    ckpt = os.path.join(first, "checkpoints", "step_00000002")
    new = ["train.lr=3e-4", "train.weight_decay=0.3", "train.beta2=0.9", "train.eps=1e-7", "train.steps=5",
           "train.lr_schedule=linear", "train.decay_steps=2"]
    straight, resumed = _run(1, config(*new, run_dir=str(tmp_path / "straight")),
                             config(*new, f"train.resume={ckpt}", run_dir=str(tmp_path / "resumed")))[0]
    assert resumed["steps"] == [3, 4, 5] and resumed["lrs"] == straight["lrs"][2:], (resumed["lrs"], straight["lrs"])
    assert resumed["groups"] == straight["groups"] == [(0.3, (0.9, 0.9), 1e-7), (0.0, (0.9, 0.9), 1e-7)]
    _, printed = run(train_and_print, 1, args=(config(*new, f"train.resume={ckpt}", run_dir=str(tmp_path / "said")),),
                     timeout=300)[0]
    assert "resuming with train.lr=0.0003 (the checkpoint's: 0.003)" in printed and "train.steps=5" in printed
    assert "train.lr_schedule=linear (the checkpoint's: cosine)" in printed


def test_a_checkpoint_whose_files_cannot_be_read_back_is_never_sealed(tmp_path):
    """A file one rank cannot read for its digest (an I/O error): the save fails on every rank, unsealed, and
    keep_last keeps the one before (it was sealed with 'unreadable' for a digest, pruned the good one, and was
    then refused as damaged: the run lost)."""
    run_dir = str(tmp_path / "run")
    ends = run(save_with_a_file_unread, 2, args=(config(*CP2, "checkpoint.interval=1", "checkpoint.keep_last=1",
                                                        "train.steps=3", run_dir=run_dir),), timeout=300)
    for end in ends:
        assert re.search(r"step_00000002.tmp: \d+ of its files could not be read back for their digests \(.*: "
                         r"unreadable \(OSError\)\); it is not marked complete", end["error"] or ""), end
        assert end["listing"] == ["step_00000001", "step_00000002.tmp"], end
    root = os.path.join(run_dir, "checkpoints")
    assert [s for s, _ in checkpoint_dirs.complete_checkpoints(root)] == [1]
    assert checkpoint_dirs.damaged_file(os.path.join(root, "step_00000001")) is None


def test_a_checkpoint_root_another_run_is_writing_is_refused(tmp_path):
    """Two runs in one root deleted each other's checkpoint in progress, sealed one of mixed files or pruned the
    other's: the root is locked by the run writing it, found at the start (a root that exists) or else at the
    first save, on every rank, before anything is written."""
    for when, steps in (("start", None), ("save", 1)):
        root = str(tmp_path / when)
        ends = run(train_into_a_held_root, 2, args=(config(*CP2, "checkpoint.interval=1", f"checkpoint.dir={root}",
                                                           run_dir=str(tmp_path / f"run_{when}")), when), timeout=300)
        for end in ends:
            assert re.search(r"checkpoint.dir .* is being written by another run still in progress",
                             end["error"] or ""), end
            assert end["step"] == steps and end["listing"] == [], end


def test_a_filesystem_without_locks_warns_instead_of_failing_every_save(tmp_path, monkeypatch, capsys):
    import errno
    import fcntl

    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    checkpoint_dirs.hold_root(str(tmp_path / "lustre"))
    assert "cannot be locked here (Function not implemented)" in capsys.readouterr().err
    checkpoint_dirs.hold_root(str(tmp_path / "lustre"))  # once per root
    assert capsys.readouterr().err == ""


def test_interrupted_checkpoints_are_never_loaded(tmp_path):
    run_dir = str(tmp_path / "run")
    _run(2, config(*CP2, "checkpoint.interval=1", "checkpoint.keep_last=0", run_dir=run_dir), stop_after=4)
    root = os.path.join(run_dir, "checkpoints")
    assert sorted(os.listdir(root)) == [f"step_0000000{i}" for i in (1, 2, 3, 4)]
    # one flipped bit in the newest (sizes agree: only its digests see it), a truncated shard in the next, a
    # missing marker in the next, a half-written .tmp: all skipped
    _flip_a_weight(os.path.join(root, "step_00000004"))
    shard = next(f for f in os.listdir(os.path.join(root, "step_00000003")) if f.endswith(".distcp"))
    with open(os.path.join(root, "step_00000003", shard), "r+b") as f:
        f.truncate(10)
    os.remove(os.path.join(root, "step_00000002", checkpoint_dirs.MARKER))
    shutil.copytree(os.path.join(root, "step_00000001"), os.path.join(root, "step_00000005.tmp"))
    said = []
    assert [s for s, _ in checkpoint_dirs.complete_checkpoints(root, log=said.append)] == [1, 4]
    assert any("step_00000003" in m and "has 10 bytes" in m for m in said), said
    assert any("step_00000002" in m and "no completion marker" in m for m in said), said
    steps, printed = _run(2, config(*CP2, "train.resume=auto", run_dir=run_dir), fn=train_and_print)[0]
    assert steps == [2, 3, 4, 5] and re.search(r"resumed from .*step_00000001 at step 1", printed), printed
    assert re.search(r"skipping checkpoint .*step_00000004: file __\d_0.distcp does not hold the bytes written",
                     printed), printed
    newest = os.path.join(root, "step_00000004")
    with pytest.raises(RankError, match=r"train.resume='.*step_00000004' is damaged: file __\d_0.distcp does not "
                                        r"hold the bytes written .*pass an older checkpoint"):
        _run(2, config(*CP2, f"train.resume={newest}", run_dir=str(tmp_path / "named")))
    # every complete one damaged: auto does not start afresh over them
    _flip_a_weight(os.path.join(root, "step_00000001"))
    with pytest.raises(RankError, match=r"train.resume=auto: every complete checkpoint under .* is damaged "
                                        r"\(.*step_00000004.*step_00000001\); restore one, or pass train.resume=none"):
        _run(2, config(*CP2, "train.resume=auto", run_dir=run_dir))


def test_a_run_never_shares_its_checkpoint_dir_with_another(tmp_path):
    # keep_last prunes a checkpoint root by step: another run's checkpoints there would be deleted by this run's
    # (or this run's by theirs), and train.resume=auto would take the newest of either
    root = str(tmp_path / "checkpoints")
    for step in (4, 8):
        tmp = os.path.join(root, f"step_{step:08d}.tmp")
        os.makedirs(tmp)
        with open(os.path.join(tmp, "w.pt"), "wb") as f:
            f.write(b"x" * step)
        checkpoint_dirs.seal(tmp, checkpoint_dirs.step_dir(root, step), root, step, keep_last=0)
    older, newest = checkpoint_dirs.step_dir(root, 4), checkpoint_dirs.step_dir(root, 8)
    with pytest.raises(ValueError, match=r"checkpoint.dir .* already holds checkpoints of an earlier run "
                                         r"\(step_00000004, step_00000008\): continue that run with train.resume=auto"):
        checkpoint_dirs.resolve_resume("none", root)
    with pytest.raises(ValueError, match=r"train.resume='.*step_00000004' continues from step 4, but .* holds later "
                                         r"checkpoints \(step_00000008\) that this run would write over or prune"):
        checkpoint_dirs.resolve_resume(older, root)
    assert checkpoint_dirs.resolve_resume("auto", root) == newest
    assert checkpoint_dirs.resolve_resume(newest, root) == newest
    assert checkpoint_dirs.resolve_resume(older, str(tmp_path / "a_root_of_its_own")) == older
    assert checkpoint_dirs.resolve_resume("none", str(tmp_path / "a_root_of_its_own")) is None


def _seal_fake(root, step, keep_last, content=b"x"):
    tmp = os.path.join(root, f"step_{step:08d}.tmp")
    os.makedirs(tmp)
    with open(os.path.join(tmp, "w.pt"), "wb") as f:
        f.write(content * 8)
    checkpoint_dirs.seal(tmp, checkpoint_dirs.step_dir(root, step), root, step, keep_last=keep_last)


def test_keep_last_never_prunes_for_a_later_checkpoint_the_resume_skipped(tmp_path):
    # step 8 damaged (sizes intact: complete by its marker), so train.resume=auto went on from step 4; the step 5
    # it writes next must not be pruned for step 8, nor the step 4 it needs until then
    root = str(tmp_path / "checkpoints")
    for step in (4, 8):
        _seal_fake(root, step, keep_last=0)
    _overwrite(os.path.join(checkpoint_dirs.step_dir(root, 8), "w.pt"), b"y")
    _seal_fake(root, 5, keep_last=2)
    assert sorted(os.listdir(root)) == ["step_00000004", "step_00000005", "step_00000008"]
    _seal_fake(root, 6, keep_last=1)
    assert sorted(os.listdir(root)) == ["step_00000006", "step_00000008"]
    # reaching step 8 replaces the damaged one with what this run wrote, and prunes as usual
    _seal_fake(root, 8, keep_last=1, content=b"z")
    assert sorted(os.listdir(root)) == ["step_00000008"]
    assert [why for _, why, _ in checkpoint_dirs.survey(root)] == [None]


def test_a_marker_of_another_shape_is_a_damaged_one(tmp_path):
    # valid JSON that is not what seal() writes (a list, no files, sizes that are not sizes) vouches for nothing
    root = str(tmp_path / "checkpoints")
    for step, marker in enumerate(([], {"files": {}}, {"files": {"w.pt": "8"}}, {"files": {"w.pt": 8}, "sha256": []},
                                   {"files": {"w.pt": 8}}), start=1):
        path = checkpoint_dirs.step_dir(root, step)
        os.makedirs(path)
        with open(os.path.join(path, "w.pt"), "wb") as f:
            f.write(b"x" * 8)
        with open(os.path.join(path, checkpoint_dirs.MARKER), "w") as f:
            json.dump(marker, f)
    said = []
    assert [s for s, _ in checkpoint_dirs.complete_checkpoints(root, log=said.append)] == [5]
    assert len(said) == 4 and all("damaged completion marker" in m for m in said), said
    assert [why is None for _, why, _ in checkpoint_dirs.survey(root)] == [False] * 4 + [True]


def test_the_telling_line_of_a_gathered_traceback_is_the_error_not_its_source():
    gathered = RuntimeError('Traceback (most recent call last):\n  File "x.py", line 3, in f\n    raise RuntimeError('
                            'f"Missing key in checkpoint state_dict: {fqn}.")\nRuntimeError: Missing key in checkpoint '
                            'state_dict: model.layers.2.attention_norm.weight.')
    assert checkpoint_read.telling_line(gathered) == ("RuntimeError: Missing key in checkpoint state_dict: "
                                                      "model.layers.2.attention_norm.weight.")


def test_settings_without_effect_are_no_change_of_model(tmp_path):
    # a checkpoint written before such settings were refused: its type-none scaling factor is not a change
    from longctx.config import to_yaml
    from longctx.train.same_run import model_changes

    (tmp_path / "config.yaml").write_text(to_yaml(load(overrides=["model.rope_scaling.factor=16",
                                                                  "model.dilated.w0=8"])))
    assert model_changes(str(tmp_path), load().model) == ""
    assert model_changes(str(tmp_path), load(overrides=["model.rope_theta=5"]).model) == \
        "model.rope_theta=10000.0 (this run: 5.0)"


def _overwrite(path, fill: bytes | None = None, seed: int = 0):
    """Same size, other bytes: what the marker's sizes cannot see (seeded random bytes unless `fill`)."""
    import random

    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.write(fill * size if fill is not None else random.Random(seed).randbytes(size))


def _flip_a_weight(path, name="model.tok_embeddings.weight"):
    """Flip one bit in the middle of a saved weight's bytes (where DCP's metadata says they lie): the file
    still unpickles and the weight still loads, wrong."""
    from torch.distributed.checkpoint import FileSystemReader

    where = next(info for index, info in FileSystemReader(path).read_metadata().storage_data.items()
                 if index.fqn == name)
    with open(os.path.join(path, where.relative_path), "r+b") as f:
        f.seek(where.offset + where.length // 2)
        byte = f.read(1)[0]
        f.seek(where.offset + where.length // 2)
        f.write(bytes([byte ^ 0x10]))


def _without_digests(path):
    """The checkpoint as written before markers held digests: sizes only."""
    with open(os.path.join(path, checkpoint_dirs.MARKER)) as f:
        marker = json.load(f)
    marker.pop("sha256")
    with open(os.path.join(path, checkpoint_dirs.MARKER), "w") as f:
        json.dump(marker, f)


def test_a_damaged_checkpoint_is_one_line_naming_the_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _run(1, config("checkpoint.interval=1", "train.steps=1", run_dir=str(run_dir)))
    good = os.path.join(run_dir, "checkpoints", "step_00000001")
    shard = next(f for f in os.listdir(good) if f.endswith(".distcp"))
    damaged = {}
    for kind in ("metadata", "shard", "trainer", "config", "flip"):
        for age in ("", "old_"):
            damaged[age + kind] = str(tmp_path / (age + kind) / "step_00000001")
            shutil.copytree(good, damaged[age + kind])
            _overwrite(os.path.join(damaged[age + "metadata"], ".metadata")) if kind == "metadata" else None
            _overwrite(os.path.join(damaged[age + "shard"], shard), b"\0") if kind == "shard" else None
            _overwrite(os.path.join(damaged[age + "trainer"], "trainer.pt"), b"\0") if kind == "trainer" else None
            _flip_a_weight(damaged[age + "flip"]) if kind == "flip" else None
            if age:
                _without_digests(damaged[age + kind])
    for age in ("", "old_"):
        with open(os.path.join(damaged[age + "config"], "config.yaml")) as f:
            text = f.read()
        with open(os.path.join(damaged[age + "config"], "config.yaml"), "w") as f:
            f.write(text.replace("dim: 32", "dim: 16"))
    # digests name the file before anything is read
    for kind, name in (("metadata", ".metadata"), ("shard", shard), ("flip", shard)):
        with pytest.raises(ConfigError, match=rf"checkpoint .*{kind}/step_00000001 is damaged: file {name} does "
                                              rf"not hold the bytes written .*; pass an older checkpoint$"):
            weights.model_weights(damaged[kind])
    # a checkpoint without digests: what reading its bytes finds, and a flipped bit loads (why digests exist)
    with pytest.raises(ConfigError, match=r"its file .metadata cannot be read .*damaged .*pass an older checkpoint"):
        weights.model_weights(damaged["old_metadata"])
    with pytest.raises(ConfigError, match=r"its files cannot be read \(.*UnpicklingError.*\): the checkpoint is"):
        weights.model_weights(damaged["old_shard"])
    flipped, clean = weights.model_weights(damaged["old_flip"])[0], weights.model_weights(good)[0]
    assert [k for k in clean if not torch.equal(clean[k], flipped[k])] == ["tok_embeddings.weight"]
    # the command that checks them: one line each, exit 1 when any is damaged
    from longctx.cli import main

    capsys.readouterr()
    assert main(["checkpoint", "verify", good]) == 0
    said = capsys.readouterr().out  # (the harness may still be relaying the training run's lines)
    assert re.search(r"step_00000001: ok \(SHA-256 of 5 files, .* MiB\)", said), said
    assert "1 of 1 checkpoints hold what was written" in said, said
    assert main(["checkpoint", "verify", damaged["old_flip"]]) == 0
    assert "ok (sizes of 5 files only (written before digests))" in capsys.readouterr().out
    assert main(["checkpoint", "verify", damaged["flip"]]) == 1
    assert f"DAMAGED: file {shard} does not hold the bytes written" in capsys.readouterr().out
    os.remove(os.path.join(damaged["old_shard"], checkpoint_dirs.MARKER))
    assert main(["checkpoint", "verify", os.path.dirname(damaged["old_shard"])]) == 1
    assert "NOT COMPLETE: no completion marker" in capsys.readouterr().out
    # config.yaml is not a weight file: an edited one reaches the shape check (and resuming refuses it)
    for age in ("", "old_"):
        with pytest.raises(ConfigError, match=r"does not fit this model: size mismatch for .*use the config it was"):
            weights.export(damaged[age + "config"], str(tmp_path / f"hf{age}"), fmt="hf")
    for kind, pattern in (("trainer", r"is damaged: file trainer.pt does not hold"),
                          ("config", r"is damaged: file config.yaml does not hold"),
                          ("old_trainer", r"its file trainer.pt cannot be read"),
                          ("old_metadata", r"its file .metadata cannot be read")):
        with pytest.raises(RankError, match=pattern):
            _run(1, config("train.steps=2", f"train.resume={damaged[kind]}", run_dir=str(tmp_path / f"r_{kind}")))


def test_bad_resume_and_shape_mismatch(tmp_path):
    with pytest.raises(ConfigError, match=r"train.resume='/nonexistent/ckpt' does not exist"):
        validate_job(load(overrides=["train.resume=/nonexistent/ckpt"]), 1)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RankError, match=r"holds no complete checkpoint"):
        _run(2, config(*CP2, f"train.resume={empty}", run_dir=str(tmp_path / "r")))
    run_dir = str(tmp_path / "small")
    _run(2, config(*CP2, "train.steps=1", "checkpoint.interval=1", run_dir=run_dir))
    with pytest.raises(RankError, match=r"does not fit this model: ValueError: Size mismatch between saved "
                                        r"torch.Size\(\[256, 32\]\) and current: torch.Size\(\[256, 64\]\) for "
                                        r"model.tok_embeddings.weight \(it was written with model.dim=32 \(this "
                                        r"run: 64\)\); resume with the config it was written with"):
        _run(2, config(*CP2, "model.dim=64", "train.resume=auto", run_dir=run_dir))
    # another model in the same shapes (heads x head_dim, the RoPE base) would load and compute something else
    errors = _run(2, [config(*CP2, "model.n_heads=2", "model.n_kv_heads=1", "train.resume=auto", run_dir=run_dir),
                      config(*CP2, "model.rope_theta=500", "train.resume=auto", run_dir=run_dir)], fn=resume_errors)[0]
    assert re.search(r"was written with model.n_heads=4 \(this run: 2\), model.n_kv_heads=2 \(this run: 1\): a resumed "
                     r"run continues the model that wrote it; .* or start a new stage from its weights with "
                     r"train.init_from=", errors[0]), errors[0]
    assert "model.rope_theta=10000.0 (this run: 500.0)" in errors[1], errors[1]
    # what decides the data stream, changed: said
    steps, printed = _run(2, config(*CP2, "train.steps=2", "train.seed=7", "train.resume=auto", run_dir=run_dir),
                          fn=train_and_print)[0]
    assert steps == [2] and "warning: " in printed and "train.seed=0 (this run: 7)" in printed, printed


def test_export_loads_into_the_plain_model(tmp_path, monkeypatch):
    from torch.distributed.checkpoint import FileSystemReader

    run_dir = str(tmp_path / "run")
    cfg = config(*CP2, "train.steps=2", "checkpoint.interval=2", run_dir=run_dir)
    res = _run(2, cfg)[0][0]
    read, read_data = [], FileSystemReader.read_data

    def spy(self, plan, planner):
        read.extend(item.storage_index.fqn for item in plan.items)
        return read_data(self, plan, planner)

    monkeypatch.setattr(FileSystemReader, "read_data", spy)
    state = weights.export(os.path.join(run_dir, "checkpoints"), str(tmp_path / "model.pt"))
    assert read and all(fqn.startswith("model.") for fqn in read)  # the optimizer state is not read
    model = build_model(from_dict(cfg).model)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert _same(state, res["params"])
    tokens = torch.randint(0, 64, (1, 16))
    assert model(tokens).shape == (1, 16, from_dict(cfg).model.vocab_size)


def test_evaluation_reads_its_tensor_parallel_pieces_of_a_pipeline_checkpoint(tmp_path):
    """A checkpoint written by pipeline stages (saved under the unsplit model's names) loads into a model split
    over tp ranks for evaluation: each rank reads its rows through DCP, and together they are the saved weights."""
    run_dir = str(tmp_path / "pp")
    _run(2, config("parallel.pp=2", "parallel.cp=1", "parallel.dp_shard=1", "train.steps=1",
                   "checkpoint.interval=1", run_dir=run_dir))
    root = os.path.join(run_dir, "checkpoints")
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(checkpoint_dirs.locate(root, root)).read_metadata().state_dict_metadata
    assert "model.layers.1.attention.wq.weight" in keys  # not the rank's stage index (0) in front
    assert "optim.state.layers.1.attention.wq.weight.exp_avg" in keys and "optim.param_groups" not in keys
    saved = weights.export(root, str(tmp_path / "model.pt"))
    for got in _run(2, root, 2, fn=tp_pieces):
        assert got["local_wq"] == (16, 32)  # half of the 32 query rows
        assert _same(got["state"], saved)


def test_cli_export_and_its_errors(tmp_path, capsys):
    from longctx.cli import main

    run_dir = str(tmp_path / "run")
    _run(2, config(*CP2, "train.steps=1", "checkpoint.interval=1", run_dir=run_dir))
    out = tmp_path / "model.pt"
    assert main(["checkpoint", "export", os.path.join(run_dir, "checkpoints"), str(out)]) == 0
    assert "exported 21 tensors" in capsys.readouterr().out and out.exists()
    assert main(["checkpoint", "export", str(tmp_path / "nope"), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error:") and "does not exist" in err
    assert main(["checkpoint", "export", os.path.join(run_dir, "checkpoints"), str(tmp_path)]) == 2
    assert f"{tmp_path} is a directory; the torch format writes one file" in capsys.readouterr().err
    assert main(["checkpoint", "export", os.path.join(run_dir, "checkpoints"), str(out), "--format", "hf"]) == 2
    assert "is a file; the hf format writes a directory" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe")  # a device or pipe would be replaced by the renamed export
    assert main(["checkpoint", "export", os.path.join(run_dir, "checkpoints"), str(tmp_path / "pipe")]) == 2
    assert "pipe is not a regular file (a device or pipe)" in capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    os.remove(tmp_path / "pipe")
    step = os.path.join(run_dir, "checkpoints", "step_00000001")
    _a_link_is_written_through(os.path.join(run_dir, "checkpoints"), out, step, tmp_path / "links", capsys)
    for inside, fmt in ((os.path.join(step, "__0_0.distcp"), "torch"), (os.path.join(step, "model.pt"), "torch"),
                        (os.path.join(step, "hf", "x"), "hf")):  # an export must never change a checkpoint
        assert main(["checkpoint", "export", os.path.join(run_dir, "checkpoints"), inside, "--format", fmt]) == 2
        assert f"is inside checkpoint {step}, whose files it would change" in capsys.readouterr().err
    assert main(["checkpoint", "verify", step]) == 0
    capsys.readouterr()
    _a_full_disk_leaves_no_export_behind(os.path.join(run_dir, "checkpoints"), out, tmp_path)
    os.remove(os.path.join(run_dir, "checkpoints", "step_00000001", checkpoint_dirs.MARKER))
    assert main(["checkpoint", "export", os.path.join(run_dir, "checkpoints", "step_00000001"), str(out)]) == 2
    assert "no completion marker" in capsys.readouterr().err


def _a_link_is_written_through(root, exported, step, where, capsys):
    """OUT a link, as `data prepare` takes one: the directory or file it names gets the export and the link stays
    (the hf export swapped the link itself for its directory, then failed saying nothing was left); a link into
    a checkpoint is refused like the checkpoint's own path."""
    from longctx.cli import main

    where.mkdir()
    (where / "dir").mkdir()
    (where / "file.pt").write_bytes(b"an older export")
    for name, target in (("dir_link", "dir"), ("file_link.pt", "file.pt"), ("into", step)):
        (where / name).symlink_to(where / target)
    assert main(["checkpoint", "export", root, str(where / "dir_link"), "--format", "hf"]) == 0
    assert main(["checkpoint", "export", root, str(where / "file_link.pt")]) == 0
    assert (where / "dir_link").is_symlink() and (where / "file_link.pt").is_symlink()
    assert sorted(os.listdir(where)) == ["dir", "dir_link", "file.pt", "file_link.pt", "into"]  # nothing partial
    assert "config.json" in os.listdir(where / "dir")
    theirs, ours = torch.load(where / "file.pt"), torch.load(exported)
    assert theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)
    capsys.readouterr()
    assert main(["checkpoint", "export", root, str(where / "into" / "model.pt")]) == 2
    assert f"is inside checkpoint {step}, whose files it would change" in capsys.readouterr().err


def _a_full_disk_leaves_no_export_behind(root, good, tmp_path):
    """An export killed by a full disk (a file-size limit on the process: writes past it fail with EFBIG) is
    one line, leaves no half file or half Hugging Face directory, and an earlier export at OUT unchanged."""
    import resource
    import subprocess
    import sys

    before = good.read_bytes()
    limit = len(before) // 2

    def export(out, *extra):
        return subprocess.run([sys.executable, "-m", "longctx", "checkpoint", "export", root, str(out), *extra],
                              capture_output=True, text=True, timeout=300,
                              preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))

    for out, extra in ((good, []), (tmp_path / "hf_export", ["--format", "hf"])):
        p = export(out, *extra)
        assert p.returncode == 2 and p.stderr.startswith(f"longctx: error: OUT {out}: writing the export failed"), \
            p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert sorted(os.listdir(tmp_path)) == ["links", "model.pt", "run"], os.listdir(tmp_path)  # no partial one
    assert good.read_bytes() == before


@pytest.mark.slow
def test_deepspeed_checkpoints_resume_bit_for_bit(tmp_path):
    """DeepSpeed's own (ZeRO-partitioned) checkpoints inside longctx's: stopped and resumed equals the
    uninterrupted run bit for bit at ZeRO-1 and ZeRO-3, read back weights-only; export gives the weights;
    under another ZeRO stage, data-parallel or world size (or precision), or under FSDP2, the full master
    weights and Adam states resume it within 1e-5 of the uninterrupted run, and an FSDP2 checkpoint resumes
    under DeepSpeed the same way."""
    pytest.importorskip("deepspeed", reason="pip install 'longctx[deepspeed]' (make test installs it)")
    configs, stops = [], []
    for stage in (1, 3):
        ds = ["parallel.engine=deepspeed", f"parallel.zero_stage={stage}", *CP2]
        run_dir = str(tmp_path / f"zero{stage}")
        configs += [config(*ds, run_dir=str(tmp_path / f"full{stage}")),
                    config(*ds, "checkpoint.interval=2", run_dir=run_dir),
                    config(*ds, "train.resume=auto", run_dir=run_dir)]
        stops += [None, 3, None]
    bf16_dir = str(tmp_path / "bf16")  # DeepSpeed casts the module to bf16: the checkpoint keeps fp32 masters
    configs.append(config("parallel.engine=deepspeed", "parallel.zero_stage=2", *CP2, "train.precision=bf16",
                          "train.steps=1", "checkpoint.interval=1", run_dir=bf16_dir))
    stops.append(None)
    res = run(train_and_collect, 2, args=(configs, stops), timeout=600)[0]
    bf16 = weights.export(os.path.join(bf16_dir, "checkpoints"), str(tmp_path / "bf16.pt"))
    assert {v.dtype for v in bf16.values()} == {torch.float32} and _same(bf16, res[6]["params"])
    for stage, (full, first, resumed) in zip((1, 3), (res[0:3], res[3:6])):
        assert first["checkpoint"].endswith("step_00000003") and first["losses"] == full["losses"][:3], stage
        assert resumed["resumed_from"].endswith("step_00000003") and resumed["steps"] == [4, 5], stage
        assert resumed["losses"] == full["losses"][3:], stage  # bit for bit
        assert _same(resumed["params"], full["params"]), stage
        root = str(tmp_path / f"zero{stage}" / "checkpoints")
        assert os.path.isdir(os.path.join(root, "step_00000003", "deepspeed"))
        assert _same(weights.export(root, str(tmp_path / f"zero{stage}.pt")), first["params"])
    ckpt = str(tmp_path / "zero3" / "checkpoints" / "step_00000003")
    zero1 = str(tmp_path / "zero1" / "checkpoints" / "step_00000003")
    fsdp = ["parallel.dp_shard=2", "parallel.cp=1"]  # sharded (DTensor) parameters and Adam states
    torch_runs = [config(*fsdp, run_dir=str(tmp_path / "fsdp")),
                  config(*fsdp, "checkpoint.interval=3", run_dir=str(tmp_path / "dcp"))]
    fsdp_full, _ = run(train_and_collect, 2, args=(torch_runs, [None, 3]), timeout=300)[0]
    dcp_ckpt = str(tmp_path / "dcp" / "checkpoints" / "step_00000003")
    ds = ["parallel.engine=deepspeed"]
    two = run(train_and_collect, 2, args=([config(*ds, "parallel.zero_stage=1", *CP2, f"train.resume={ckpt}",
                                                  run_dir=str(tmp_path / "z3to1")),
                                           config(*fsdp, f"train.resume={ckpt}", run_dir=str(tmp_path / "z3tofsdp")),
                                           config(*ds, "parallel.zero_stage=2", *CP2, f"train.resume={dcp_ckpt}",
                                                  run_dir=str(tmp_path / "fsdptoz2")),
                                           config(*ds, "parallel.zero_stage=3", *CP2, "train.precision=bf16",
                                                  f"train.resume={ckpt}", run_dir=str(tmp_path / "bf16to"))],),
              timeout=300)[0]
    four = run(train_and_collect, 4, args=([config(*ds, "parallel.zero_stage=3", "parallel.dp_shard=2", "parallel.cp=2",
                                                   f"train.resume={zero1}", run_dir=str(tmp_path / "z1to3"))],),
               timeout=300)[0][0]
    assert [r["engine"] for r in two] == ["deepspeed", "fsdp", "deepspeed", "deepspeed"]
    for name, got, full in (("ZeRO-3 to ZeRO-1", two[0], res[3]), ("ZeRO-3 to FSDP2", two[1], res[3]),
                            ("FSDP2 to ZeRO-2", two[2], fsdp_full),
                            ("ZeRO-1 x cp=2 to ZeRO-3 x dp=2 x cp=2", four, res[0])):
        assert got["resumed_from"].endswith("step_00000003") and got["steps"] == [4, 5], name
        for a, b in zip(got["losses"], full["losses"][3:]):
            assert abs(a - b) <= 1e-5 * abs(b), (name, a, b)
        worst = max((got["params"][k] - full["params"][k]).abs().max().item() for k in full["params"])
        assert worst <= 1e-5, (name, worst)
    for a, b in zip(two[3]["losses"], res[3]["losses"][3:]):  # fp32 masters and states, bf16 compute
        assert abs(a - b) <= 2e-2 * abs(b), ("to bf16", a, b)
    old = str(tmp_path / "old" / "step_00000003")  # written before checkpoints held the full optimizer state
    shutil.copytree(ckpt, old)
    os.remove(os.path.join(old, checkpoint.FULL_OPTIMIZER))
    with open(os.path.join(old, checkpoint_dirs.MARKER)) as f:
        marker = json.load(f)
    marker["files"].pop(checkpoint.FULL_OPTIMIZER)
    marker["sha256"].pop(checkpoint.FULL_OPTIMIZER)
    with open(os.path.join(old, checkpoint_dirs.MARKER), "w") as f:
        json.dump(marker, f)
    errors = run(resume_errors, 2, args=([config(*ds, "parallel.zero_stage=1", *CP2, f"train.resume={old}"),
                                          config(*CP2, f"train.resume={old}"),
                                          config(*ds, "parallel.zero_stage=3", *CP2, "model.ffn_dim=96",
                                                 f"train.resume={ckpt}")],), timeout=300)[0]
    assert "was written by DeepSpeed ZeRO-3" in errors[0] and "resumed as ZeRO-1" in errors[0], errors
    assert all("it has no optimizer.pt (it predates resharding)" in e for e in errors[:2]), errors
    assert re.search(r"does not fit this model: .* \(it was written with model.ffn_dim=64 \(this run: 96\)\); "
                     r"resume with the config it was written with", errors[2]), errors[2]

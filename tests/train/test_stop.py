"""Stopping on a scheduler's signal: every rank stops after the same step with a checkpoint of it, and the
resumed run ends bit for bit where the uninterrupted one does; `longctx launch local` passes SIGTERM on to
its ranks and exits 143, and ranks whose launcher was killed outright checkpoint and exit instead of
training on."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from longctx.launch import RankError, run
from longctx.train.stop import StopSignals, request_stop

from ._workers import (
    config,
    signalled_before_any_loop,
    signalled_then_train,
    signalled_while_starting,
    stopped_by_signal,
    train_and_collect,
)


def test_one_rank_signalled_stops_all_after_that_step_and_resume_is_exact(tmp_path):
    full = run(train_and_collect, 2, args=([config("parallel.cp=2", run_dir=str(tmp_path / "full"))],),
               timeout=180)[0][0]
    stop_dir = str(tmp_path / "stop")
    stopped = run(stopped_by_signal, 2, args=(config("parallel.cp=2", run_dir=stop_dir), 1, 3), timeout=180)
    for rank in stopped:  # checkpoint.interval is 0: the signal alone asked for this checkpoint
        assert rank["steps"] == [1, 2, 3] and rank["summary"]["stopped_by"] == "SIGTERM"
        assert rank["summary"]["checkpoint"] == os.path.join(stop_dir, "checkpoints", "step_00000003")
    assert os.listdir(os.path.join(stop_dir, "checkpoints")) == ["step_00000003"]
    resumed = run(train_and_collect, 2, args=([config("parallel.cp=2", "train.resume=auto", run_dir=stop_dir)],),
                  timeout=180)[0][0]
    assert resumed["steps"] == [4, 5] and resumed["losses"] == full["losses"][3:]
    assert all(bool((resumed["params"][k] == v).all()) for k, v in full["params"].items())


def test_a_signal_while_the_job_starts_stops_it_after_one_step_with_a_checkpoint(tmp_path):
    """Not the default action (the rank dead, its peers failing, nothing saved): the loop acts on it."""
    run_dir = str(tmp_path / "run")
    summaries = run(signalled_while_starting, 2, args=(config("parallel.cp=2", run_dir=run_dir),), timeout=180)
    for summary in summaries:
        assert summary["steps"] == 1 and summary["stopped_by"] == "SIGTERM", summary
    assert os.listdir(os.path.join(run_dir, "checkpoints")) == ["step_00000001"]


def test_a_rank_that_will_train_records_a_stop_from_its_first_instruction():
    """run(record_stops=True), what `launch local` uses: a SIGTERM before the loop listens (rendezvous, unpickling)
    is kept for the loop; without it the rank dies of it, as any other function's rank should."""
    assert run(signalled_before_any_loop, 2, args=(True,), timeout=60, record_stops=True) == [signal.SIGTERM] * 2
    with pytest.raises(RankError, match=r"exit code -15 \(SIGTERM\)"):
        run(signalled_before_any_loop, 2, args=(True,), timeout=60)


def test_a_recorded_stop_under_on_signal_false_ends_the_rank(tmp_path):
    """checkpoint.on_signal=false: the default action, also for a signal recorded before the job started."""
    off = config("parallel.cp=2", "checkpoint.on_signal=false", run_dir=str(tmp_path / "off"))
    with pytest.raises(RankError, match=r"exit code -15 \(SIGTERM\)"):
        run(signalled_then_train, 2, args=(off,), timeout=120, record_stops=True)
    on = run(signalled_then_train, 2, args=(config("parallel.cp=2", run_dir=str(tmp_path / "on")),), timeout=120,
             record_stops=True)
    assert [s["steps"] for s in on] == [1, 1] and on[0]["stopped_by"] == "SIGTERM"


def test_a_signal_a_finished_loop_left_is_not_taken_by_the_next():
    with StopSignals() as outer:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert outer.received == signal.SIGTERM
        with StopSignals() as loop:  # the training loop inside takes it over
            assert loop.received == signal.SIGTERM and outer.received == 0
        with StopSignals() as again:
            assert again.received == 0


def test_signals_are_recorded_only_inside_and_only_when_enabled():
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals(enabled=False) as off:
        assert signal.getsignal(signal.SIGTERM) is before and off.received == 0
    with StopSignals() as on:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.01)
        assert on.received == signal.SIGUSR1
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal changes nothing, not even the name
        time.sleep(0.01)
        assert on.received == signal.SIGUSR1
    assert signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_a_stop_can_be_requested_from_another_thread():
    # what the Ray launcher's workers do: their training loop runs off the main thread, out of signals' reach
    assert not request_stop(signal.SIGTERM)  # no loop listening
    with StopSignals(enabled=False) as off:  # checkpoint.on_signal=false
        assert not request_stop(signal.SIGTERM) and off.received == 0
    with StopSignals() as on:
        asker = threading.Thread(target=request_stop, args=(signal.SIGUSR1,))
        asker.start()
        asker.join()
        assert on.received == signal.SIGUSR1
    assert not request_stop(signal.SIGTERM)


def _launch(run_dir, *extra, capture=True, session=False):
    cmd = [sys.executable, "-m", "longctx", "launch", "local", "--nproc", "2", "configs/tiny.yaml",
           "train.steps=100000", "train.seq_len=256", "logging.quiet=true", "logging.tensorboard=false",
           f"run_dir={run_dir}", *extra]
    out = subprocess.PIPE if capture else subprocess.DEVNULL  # ranks outliving the launcher would hold a pipe
    return subprocess.Popen(cmd, stdout=out, stderr=out, text=True, start_new_session=session)


def _wait_for_steps(proc, run_dir, steps=3):
    metrics = os.path.join(run_dir, "metrics.jsonl")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:  # a few steps in, then the signal
        if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= steps:
            return
        time.sleep(0.2)
    proc.kill()
    pytest.fail(f"training did not start: {proc.communicate()}")


def _ranks(psutil, launcher_pid):
    """The rank processes: forked by the forkserver, a child of the launcher."""
    launcher = psutil.Process(launcher_pid)
    direct = {c.pid for c in launcher.children()}
    return [c for c in launcher.children(recursive=True) if c.ppid() in direct]


def _last_step(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return json.loads(f.readlines()[-1])["step"]


@pytest.mark.slow
def test_launch_local_passes_sigterm_on_and_outliving_ranks_stop(tmp_path):
    psutil = pytest.importorskip("psutil")
    run_dir, kill_dir = str(tmp_path / "term"), str(tmp_path / "kill")
    proc, victim = _launch(run_dir, "data.workers=1"), _launch(kill_dir, capture=False)  # start-ups overlap
    try:
        _wait_for_steps(proc, run_dir)
        workers = [w for r in _ranks(psutil, proc.pid) for w in r.children()]  # DataLoader workers
        assert len(workers) == 2, workers
        for w in workers:  # as a scheduler signalling every process would: they must not die of it mid-step
            w.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)  # the ranks hear it from the launcher alone
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM, (out, err)
        step = _last_step(run_dir)
        assert f"stopped by SIGTERM after {step} steps" in out
        assert os.listdir(os.path.join(run_dir, "checkpoints")) == [f"step_{step:08d}"]

        run_dir, proc = kill_dir, victim
        _wait_for_steps(proc, run_dir)
        ranks = _ranks(psutil, proc.pid)
        assert len(ranks) == 2, ranks
        proc.kill()  # no handler runs: the ranks find out through their lifeline
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(ranks, timeout=60)
        running = []
        for p in alive:  # an exited rank nobody has reaped yet (a zombie) has stopped all the same
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p)
                    p.kill()
            except psutil.NoSuchProcess:
                pass
        assert not running, "ranks outlived their launcher and went on training"
        step = _last_step(run_dir)
        assert os.listdir(os.path.join(run_dir, "checkpoints")) == [f"step_{step:08d}"]
    finally:  # whatever failed, nothing is left running (the victim's ranks follow it)
        for p in (proc, victim):
            if p.poll() is None:
                p.kill()


@pytest.mark.slow
def test_a_signal_to_every_process_of_the_job_still_ends_in_a_checkpoint(tmp_path):
    """scancel, systemd and `kill -- -PGID` signal the launcher, its forkserver, the ranks and their workers at
    once. The forkserver must not die of it: its closing sentinels read as every rank dead (exit code 255), and
    the launcher left with exit 1 while its ranks were still writing the checkpoint."""
    run_dir = str(tmp_path / "group")
    proc = _launch(run_dir, "data.workers=1", session=True)
    try:
        _wait_for_steps(proc, run_dir)
        os.killpg(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 128 + signal.SIGTERM and "exit code" not in err, (out, err)
        step = _last_step(run_dir)
        assert f"stopped by SIGTERM after {step} steps" in out
        assert os.listdir(os.path.join(run_dir, "checkpoints")) == [f"step_{step:08d}"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)

"""torchrun, as on a real cluster: two agents ("two nodes", 2 ranks each) on loopback run `python -m longctx
train` and compute the same losses as the simulated cluster; a rank that fails shows its traceback."""

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

from ._jobs import ROOT, TINY, free_port, kill_after_checkpoint, losses, same_final_weights

SMALL = ["train.seq_len=256", "train.steps=3", "train.batch_size=4", "model.dim=32", "model.ffn_dim=64",
         "logging.quiet=true", "logging.tensorboard=false", "parallel.dp_shard=2", "parallel.cp=2"]


def _torchrun(overrides, timeout=240, restarts=0):
    port = free_port()
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{port}", "--local-addr", "127.0.0.1", "--max-restarts", str(restarts), "-m", "longctx",
           "train", TINY, *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # each agent leads a session of its own, so a timed-out test takes the agent's workers down with it
    agents = [subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True) for _ in range(2)]
    out = []
    try:
        for a in agents:
            out.append(a.communicate(timeout=timeout)[0])
    finally:
        for a in agents:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(a.pid, signal.SIGKILL)
    return [a.returncode for a in agents], "\n".join(out)


def test_two_node_torchrun_equals_the_simulated_cluster_and_a_failing_rank_shows_its_traceback(tmp_path):
    from longctx.cli import main

    assert main(["launch", "local", "--nproc", "4", TINY, *SMALL, f"run_dir={tmp_path / 'local'}"]) == 0
    # (one launch for both: the 3 steps run, then saving the final checkpoint fails under a regular file that
    # appears once training has begun: one in the way from the start is refused before any rank starts)
    blocker, metrics = tmp_path / "file", tmp_path / "torchrun" / "metrics.jsonl"

    def block_after_the_first_step():
        deadline = time.time() + 200
        while time.time() < deadline and not metrics.exists():
            time.sleep(0.02)
        blocker.write_text("not a directory")

    thread = threading.Thread(target=block_after_the_first_step, daemon=True)
    thread.start()
    codes, out = _torchrun([*SMALL, "checkpoint.interval=3", f"checkpoint.dir={blocker}/ckpt",
                            f"run_dir={tmp_path / 'torchrun'}"])
    thread.join(timeout=5)
    local, multi = losses(tmp_path / "local"), losses(tmp_path / "torchrun")
    assert len(local) == len(multi) == 3, out[-3000:]
    for a, b in zip(multi, local):
        assert abs(a - b) <= 1e-6 * abs(b), (multi, local)
    assert codes != [0, 0]
    assert "NotADirectoryError" in out or "FileExistsError" in out, out[-3000:]
    assert "checkpoint.py" in out, out[-3000:]  # where it happened, not only an exit code


def _first_attempts_rank_1(p) -> bool:
    env = p.environ()
    return env.get("RANK") == "1" and env.get("TORCHELASTIC_RESTART_COUNT") == "0" and "longctx" in " ".join(
        p.cmdline())


def test_without_restarts_a_killed_rank_ends_the_job_naming_it(tmp_path):
    run_dir = str(tmp_path / "killed")
    thread, done = kill_after_checkpoint(run_dir, 1, _first_attempts_rank_1, delay=1.0)  # into step 2
    codes, out = _torchrun([*SMALL, "train.steps=50", "checkpoint.interval=1", f"run_dir={run_dir}"])
    thread.join(timeout=5)
    assert "pid" in done and codes != [0, 0]
    # torchrun's summary names the lost rank and its signal (the survivors are stopped by their agents)
    assert re.search(r"rank\s*:\s*1 \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*-9", out), out[-3000:]


def test_a_killed_rank_restarts_and_resumes_to_the_uninterrupted_result(tmp_path):
    from longctx.cli import main

    steps = ["train.steps=14", "checkpoint.interval=1", "checkpoint.keep_last=2", "train.resume=auto"]
    # the uninterrupted run needs only its final checkpoint (for its parameters)
    assert main(["launch", "local", "--nproc", "4", TINY, *SMALL, *steps, "checkpoint.interval=14",
                 f"run_dir={tmp_path / 'whole'}"]) == 0
    run_dir = str(tmp_path / "restarted")
    thread, done = kill_after_checkpoint(run_dir, 3, _first_attempts_rank_1)
    codes, out = _torchrun([*SMALL, *steps, f"run_dir={run_dir}"], restarts=2)
    thread.join(timeout=5)
    assert "pid" in done, out[-3000:]
    assert codes == [0, 0], out[-3000:]
    assert re.search(r"resumed from \S+step_0000000[3-9] at step [3-9]", out), out[-3000:]
    assert same_final_weights(str(tmp_path / "whole"), run_dir, tmp_path)
    # every step once in metrics.jsonl, the repeated ones replaced by the resumed attempt's
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 15))
    assert losses(run_dir) == losses(tmp_path / "whole")


def test_an_unreachable_rendezvous_fails_within_its_timeout(tmp_path):
    import time

    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
           f"127.0.0.1:{free_port()}", "--rdzv-conf", "is_host=false,timeout=4,read_timeout=4", "-m", "longctx",
           "train", TINY, *SMALL, f"run_dir={tmp_path}"]
    t0 = time.monotonic()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and time.monotonic() - t0 < 90
    assert "Rendezvous" in p.stdout + p.stderr, (p.stdout + p.stderr)[-2000:]


def test_ranks_whose_agent_is_killed_checkpoint_and_stop(tmp_path):
    """torch elastic starts each rank in a session of its own, so its agent killed (SIGKILL, an OOM kill, a
    SIGUSR1 it does not handle) takes no rank with it: the ranks notice their parent gone, checkpoint the
    step in flight as on SIGTERM, and exit, rather than train on with no one to stop them."""
    import psutil

    run_dir = tmp_path / "orphaned"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", "2", "-m", "longctx", "train", TINY, *SMALL,
           "parallel.cp=1", "train.steps=5000", "checkpoint.interval=5000", f"run_dir={run_dir}"]
    agent = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)

    def ranks():
        found = []
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if str(run_dir) in " ".join(p.cmdline()) and p.pid != agent.pid:
                    found.append(p)
        return found

    try:
        deadline = time.time() + 240
        while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
            time.sleep(0.1)
        assert (run_dir / "metrics.jsonl").exists() and len(ranks()) == 2
        agent.kill()
        agent.wait(timeout=10)
        deadline = time.time() + 120
        while time.time() < deadline and ranks():
            time.sleep(0.2)
        assert not ranks(), "the ranks outlived their agent"
        saved = sorted(os.listdir(run_dir / "checkpoints"))
        assert len(saved) == 1 and int(saved[0].split("_")[1]) < 5000, saved
    finally:
        for p in ranks():
            with contextlib.suppress(psutil.Error):
                p.kill()

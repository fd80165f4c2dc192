"""`longctx launch ray` on a Ray cluster this test starts (`ray start --head`, token authentication on),
submitted with `ray job submit`: it computes what the simulated cluster computes, and with Ray's
FailureConfig a worker killed mid-run is restarted and resumes to the uninterrupted run's parameters.
Without Ray the error names the extra."""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from longctx.cli import main

from ._jobs import TINY, free_port, kill_after_checkpoint, losses, same_final_weights

SMALL = ["train.seq_len=256", "train.steps=3", "train.batch_size=2", "model.dim=32", "model.ffn_dim=64",
         "logging.quiet=true", "logging.tensorboard=false"]


def _session_processes(sid):
    import psutil

    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == sid:
                found.append(p)
    return found


@pytest.fixture(scope="module")
def ray_head():
    """A Ray head node on this machine, as an operator starts one (its processes in a session of their own, so
    the test stops this cluster and no other: `ray stop` would stop every Ray on the machine)."""
    pytest.importorskip("ray.train", reason="pip install 'longctx[ray]' (make test installs it)")
    import psutil

    bin_dir = os.path.dirname(sys.executable)
    temp_dir = tempfile.mkdtemp(prefix="lcray")  # short: Ray's socket paths have a length limit
    dashboard = free_port()
    starter = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
         "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()), "--temp-dir", temp_dir,
         "--disable-usage-stats"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    out = starter.communicate(timeout=120)[0]
    try:
        assert starter.returncode == 0, out[-3000:]
        assert "Token authentication is enabled" in out, out[-3000:]  # kept on: the client below uses the token
        yield f"http://127.0.0.1:{dashboard}", starter.pid
    finally:
        procs = _session_processes(starter.pid)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=20)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_equals_the_simulated_cluster_and_survives_a_killed_worker(tmp_path, ray_head):
    address, sid = ray_head
    steps = ["train.steps=12", "checkpoint.interval=1", "checkpoint.keep_last=2", "train.resume=auto"]
    # the uninterrupted run needs only its final checkpoint (for its parameters)
    assert main(["launch", "local", "--nproc", "2", TINY, *SMALL, *steps, "checkpoint.interval=12",
                 f"run_dir={tmp_path / 'local'}"]) == 0
    run_dir = str(tmp_path / "ray")
    killer, done = kill_after_checkpoint(  # one Ray Train worker of this cluster
        run_dir, 3, lambda p: os.getsid(p.pid) == sid and "RayTrainWorker" in " ".join(p.cmdline()))
    # the documented submission: token auth on, the client told to use the token `ray start` wrote
    job = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "submit", "--address", address, "--",
         sys.executable, "-m", "longctx", "launch", "ray", "--address", "auto", "--num-workers", "2",
         "--max-failures", "1", TINY, *SMALL, *steps, f"run_dir={run_dir}"],
        env=dict(os.environ, RAY_AUTH_MODE="token"), capture_output=True, text=True, timeout=400)
    out = job.stdout + job.stderr
    killer.join(timeout=5)
    assert job.returncode == 0 and "succeeded" in out, out[-4000:]
    assert "pid" in done, out[-4000:]
    assert "ActorDiedError" in out and "resumed from" in out, out[-4000:]  # killed, restarted, resumed
    assert "done: 12 steps" in out
    local, on_ray = losses(tmp_path / "local"), losses(run_dir)
    assert len(local) == len(on_ray) == 12  # every step once: the lost attempt's repeated steps replaced
    for a, b in zip(on_ray, local):
        assert abs(a - b) <= 1e-6 * abs(b), (on_ray, local)
    assert same_final_weights(str(tmp_path / "local"), run_dir, tmp_path)


@pytest.mark.slow
def test_ray_job_stop_checkpoints_the_step_in_flight(tmp_path, ray_head):
    # `ray job stop` signals only the driver; the workers must still finish their step and checkpoint it
    # (no periodic checkpoints here, so the one found is the stop's), and the driver exits 128 + SIGTERM
    address, _ = ray_head
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    env = dict(os.environ, RAY_AUTH_MODE="token")
    run_dir = str(tmp_path / "stopped")
    submitted = subprocess.run(
        [ray, "job", "submit", "--address", address, "--no-wait",
         "--runtime-env-json", json.dumps({"env_vars": {"RAY_JOB_STOP_WAIT_TIME_S": "120"}}), "--",
         sys.executable, "-m", "longctx", "launch", "ray", "--address", "auto", "--num-workers", "2", TINY, *SMALL,
         "train.steps=100000", "checkpoint.interval=0", f"run_dir={run_dir}"],
        env=env, capture_output=True, text=True, timeout=120)
    found = re.search(r"Job '(\S+)' submitted successfully", submitted.stdout + submitted.stderr)
    assert submitted.returncode == 0 and found, submitted.stdout + submitted.stderr
    job_id = found.group(1)
    metrics, deadline = os.path.join(run_dir, "metrics.jsonl"), time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(losses(run_dir)) >= 2):
        time.sleep(0.5)
    stop = subprocess.run([ray, "job", "stop", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=200)
    logs = subprocess.run([ray, "job", "logs", "--address", address, job_id], env=env, capture_output=True,
                          text=True, timeout=60).stdout
    assert stop.returncode == 0, stop.stdout + stop.stderr + logs[-3000:]
    steps = len(losses(run_dir))
    assert 2 <= steps < 100000, logs[-3000:]
    assert f"stopped by SIGTERM after {steps} steps" in logs, logs[-3000:]
    saved = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert saved[-1] == f"step_{steps:08d}", (saved, steps)


def test_launch_ray_errors(tmp_path, capsys, monkeypatch):
    assert main(["launch", "ray", "--num-workers", "3", TINY, *SMALL]) == 2  # tiny's zigzag needs W | seq
    assert "longctx: error:" in capsys.readouterr().err
    assert main(["launch", "slurm", TINY]) == 2
    assert "invalid choice: 'slurm'" in capsys.readouterr().err
    import longctx._optional as optional

    real = optional.importlib.import_module

    def no_ray(name, *a):
        if name.split(".")[0] == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a)

    monkeypatch.setattr(optional.importlib, "import_module", no_ray)
    assert main(["launch", "ray", "--num-workers", "2", TINY, *SMALL, f"run_dir={tmp_path}"]) == 2
    assert "install it with: pip install 'longctx[ray]'" in capsys.readouterr().err

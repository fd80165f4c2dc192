"""`longctx launch ray` on a Ray cluster this test starts (`ray start --head`, token authentication on),
submitted with `ray job submit`: it computes what the simulated cluster computes, and with Ray's
FailureConfig a worker killed mid-run is restarted and resumes to the uninterrupted run's parameters.
Without Ray the error names the extra."""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
import torch

from longctx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["train.seq_len=256", "train.steps=3", "train.batch_size=2", "model.dim=32", "model.ffn_dim=64",
         "logging.quiet=true", "logging.tensorboard=false"]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_processes(sid):
    import psutil

    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getsid(p.pid) == sid:
                found.append(p)
    return found


@pytest.fixture
def ray_head():
    """A Ray head node on this machine, as an operator starts one (its processes in a session of their own, so
    the test stops this cluster and no other: `ray stop` would stop every Ray on the machine)."""
    pytest.importorskip("ray.train", reason="pip install 'longctx[ray]' (make test installs it)")
    import psutil

    bin_dir = os.path.dirname(sys.executable)
    temp_dir = tempfile.mkdtemp(prefix="lcray")  # short: Ray's socket paths have a length limit
    dashboard = _port()
    starter = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--num-cpus", "2", "--port", str(_port()),
         "--dashboard-port", str(dashboard), "--ray-client-server-port", str(_port()), "--temp-dir", temp_dir,
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


def _kill_a_worker_after(run_dir, step, sid, done, timeout=240.0):
    """SIGKILL one Ray Train worker of the cluster once the checkpoint of `step` is written."""
    target = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    t0 = time.time()
    while time.time() - t0 < timeout and not os.path.isdir(target):
        time.sleep(0.1)
    for p in _session_processes(sid):
        with contextlib.suppress(Exception):
            if "RayTrainWorker" in " ".join(p.cmdline()):
                p.kill()
                done["pid"] = p.pid
                return


@pytest.mark.slow
def test_ray_job_equals_the_simulated_cluster_and_survives_a_killed_worker(tmp_path, ray_head):
    from longctx.train import checkpoint

    address, sid = ray_head
    steps = ["train.steps=12", "checkpoint.interval=1", "checkpoint.keep_last=2", "train.resume=auto"]
    # the uninterrupted run needs only its final checkpoint (for its parameters)
    assert main(["launch", "local", "--nproc", "2", TINY, *SMALL, *steps, "checkpoint.interval=12",
                 f"run_dir={tmp_path / 'local'}"]) == 0
    run_dir = str(tmp_path / "ray")
    done = {}
    killer = threading.Thread(target=_kill_a_worker_after, args=(run_dir, 3, sid, done), daemon=True)
    killer.start()
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
    local, on_ray = _losses(tmp_path / "local"), _losses(run_dir)
    assert len(local) == len(on_ray) == 12  # every step once: the lost attempt's repeated steps replaced
    for a, b in zip(on_ray, local):
        assert abs(a - b) <= 1e-6 * abs(b), (on_ray, local)
    whole = checkpoint.export(str(tmp_path / "local" / "checkpoints"), str(tmp_path / "local.pt"))
    resumed = checkpoint.export(os.path.join(run_dir, "checkpoints"), str(tmp_path / "ray.pt"))
    assert set(whole) == set(resumed) and all(torch.equal(whole[k], resumed[k]) for k in whole)


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

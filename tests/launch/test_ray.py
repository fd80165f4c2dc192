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
    import secrets

    import psutil

    bin_dir = os.path.dirname(sys.executable)
    temp_dir = tempfile.mkdtemp(prefix="lcray")  # short: Ray's socket paths have a length limit
    # token authentication on, with a token of this cluster's own (not the machine's ~/.ray/auth_token):
    # `ray start` and every client get RAY_AUTH_MODE=token and the token's path
    token = os.path.join(temp_dir, "auth_token")
    with open(token, "w") as f:
        f.write(secrets.token_hex(32))
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=token)
    dashboard = free_port()
    starter = subprocess.Popen(
        [os.path.join(bin_dir, "ray"), "start", "--head", "--num-cpus", "2", "--port", str(free_port()),
         "--dashboard-port", str(dashboard), "--ray-client-server-port", str(free_port()), "--temp-dir",
         os.path.join(temp_dir, "t"), "--disable-usage-stats"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True, env=env)
    out = starter.communicate(timeout=120)[0]
    try:
        assert starter.returncode == 0, out[-3000:]
        address = f"http://127.0.0.1:{dashboard}"
        anonymous = subprocess.run([os.path.join(bin_dir, "ray"), "job", "list", "--address", address],
                                   env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
                                   capture_output=True, text=True, timeout=60)
        # the cluster refuses a client without the token
        assert anonymous.returncode != 0 and "unauthorized" in (anonymous.stdout + anonymous.stderr).lower(), \
            (anonymous.stdout + anonymous.stderr)[-2000:]
        deadline = time.time() + 90  # `ray start` returns before the head's job agent takes jobs
        while True:
            ready = subprocess.run([os.path.join(bin_dir, "ray"), "job", "submit", "--address", address, "--",
                                    sys.executable, "-c", "pass"], env=env, capture_output=True, text=True,
                                   timeout=120)
            if ready.returncode == 0 or time.time() > deadline:
                break
            time.sleep(2)
        assert ready.returncode == 0, (ready.stdout + ready.stderr)[-2000:]
        yield address, starter.pid, env
    finally:
        procs = _session_processes(starter.pid)
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(procs, timeout=20)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_ray_job_equals_the_simulated_cluster_and_survives_a_killed_worker(tmp_path, ray_head):
    address, sid, env = ray_head
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
        env=env, capture_output=True, text=True, timeout=400)
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
    address, _, env = ray_head
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
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


@pytest.mark.slow
def test_ray_workers_read_relative_paths_where_the_driver_runs_and_report_their_own_summary(tmp_path, monkeypatch,
                                                                                          capsys):
    # Ray Train runs each worker in a session directory of its own: a relative data.path was "not a prepared
    # dataset" there and a relative checkpoint.dir was written there, lost with the session. The summary is the
    # workers' own: a resumed run's first loss and its validation loss (the metrics file holds the earlier run's too).
    # (If the module's `ray start` head is up, --address local must still start a Ray of its own.)
    ray = pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abcdefghij" * (i + 3)}) + "\n" for i in range(40)))
    assert main(["data", "prepare", "--input", "c.jsonl", "--output", "ds", "--quiet"]) == 0
    job = ["launch", "ray", "--address", "local", "--num-workers", "2", TINY, *SMALL,
           "model.vocab_size=258", "data.source=tokens", "data.path=ds", "validation.holdout=2", "validation.batches=1",
           "validation.interval=3", "checkpoint.dir=ck", "checkpoint.interval=3", "run_dir=run"]
    try:
        capsys.readouterr()
        assert main(job) == 0
        assert os.path.isdir(tmp_path / "ck" / "step_00000003")
        first, said = capsys.readouterr()
        assert re.search(r"done: 3 steps, loss \S+ -> \S+, validation loss \S+", first), first
        # the workers' logs reach the driver, without Ray Train's cleaner warning each second that the state API
        # (the dashboard's, which a Ray started here runs without) does not answer
        assert "Reporting training result" in first + said and "Failed to query" not in first + said, said[-3000:]
        assert main([*job, "train.resume=auto", "train.steps=5"]) == 0
        resumed = capsys.readouterr().out
        assert sorted(os.listdir(tmp_path / "ck")) == ["step_00000003", "step_00000005"]
        step4 = losses(tmp_path / "run")[3]
        assert re.search(rf"done: 5 steps, loss {step4:.4f} -> \S+, validation loss", resumed), (resumed, step4)
    finally:
        ray.shutdown()


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


def test_launch_ray_without_a_cluster_names_the_address(tmp_path, capsys):
    pytest.importorskip("ray.train", reason="pip install 'longctx[ray]' (make test installs it)")
    import ray

    assert main(["launch", "ray", "--address", "bogus", "--num-workers", "2", TINY, *SMALL,
                 f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error: --address bogus: cannot connect to a Ray cluster (Invalid address")
    assert "`ray start --head`" in err and "--address local" in err and len(err.strip().splitlines()) == 1
    assert not ray.is_initialized()


class _CpuOnlyRay:
    """`ray` as launch_ray sees it on a machine without GPUs (no Ray is started)."""

    def __init__(self):
        self.up, self.shutdowns = False, 0

    def is_initialized(self):
        return self.up

    def init(self, **kwargs):
        self.up = True

    def cluster_resources(self):
        return {"CPU": 2.0, "memory": 2e9, "node:127.0.0.1": 1.0}

    def nodes(self):
        return [{"Alive": True, "Resources": self.cluster_resources()}]

    def shutdown(self):
        self.up, self.shutdowns = False, self.shutdowns + 1


def test_launch_ray_refuses_gpus_the_cluster_lacks_instead_of_waiting(tmp_path, capsys, monkeypatch):
    pytest.importorskip("ray.train", reason="pip install 'longctx[ray]' (make test installs it)")
    from longctx.launch import ray_launcher

    fake, real = _CpuOnlyRay(), ray_launcher.require
    monkeypatch.setattr(ray_launcher, "require", lambda name, *a: fake if name == "ray" else real(name, *a))
    assert main(["launch", "ray", "--address", "local", "--num-workers", "2", "--gpus-per-worker", "1", TINY, *SMALL,
                 f"run_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error: --num-workers 2 x --gpus-per-worker 1 needs 2 GPU(s), but this machine "
                          "(--address local) has 0 GPU(s) and 2 CPU(s): lower --num-workers or --gpus-per-worker")
    assert fake.shutdowns == 1 and not fake.up  # the Ray started for the job is stopped again


def test_check_resources():
    from longctx.config import ConfigError
    from longctx.launch.ray_launcher import _check_resources

    def check(total, nodes, workers, gpus, address="auto"):
        _check_resources(total, nodes, address=address, num_workers=workers, gpus_per_worker=gpus,
                         cpus_per_worker=1)

    two_nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 2.0}]
    check({"CPU": 16.0, "GPU": 4.0}, two_nodes, 4, 1)
    check({"CPU": 16.0, "GPU": 4.0}, two_nodes, 8, 0.5)
    check({"CPU": 2.0}, [{"CPU": 2.0}], 2, 0)
    with pytest.raises(ConfigError, match=r"--num-workers 8 x --gpus-per-worker 1 needs 8 GPU\(s\), but the Ray "
                                          r"cluster at --address auto has 4 GPU\(s\) and 16 CPU\(s\): .*add GPU nodes"):
        check({"CPU": 16.0, "GPU": 4.0}, two_nodes, 8, 1)
    with pytest.raises(ConfigError, match=r"needs 4 GPU\(s\) on one node, the most a node has is 2"):
        check({"CPU": 16.0, "GPU": 4.0}, two_nodes, 1, 4)
    with pytest.raises(ConfigError, match=r"has 0 GPU\(s\).*--gpus-per-worker 0 runs CPU workers.*with GPUs"):
        check({"CPU": 4.0}, [{"CPU": 4.0}], 1, 1, address="local")
    with pytest.raises(ConfigError, match=r"--num-workers 3 needs 3 CPU\(s\) \(1 per worker\), but .* 2 CPU\(s\)"):
        check({"CPU": 2.0}, [{"CPU": 2.0}], 3, 0)


def test_a_failed_ray_run_reads_as_the_simulated_clusters_rank_error():
    """Ray Train v2 raises a worker's failure from fit(): the lowest rank's own exception decides, so a user's
    ConfigError in a worker is one line (exit 2) like under `launch local`, and a bug keeps its traceback."""
    ray_train = pytest.importorskip("ray.train", reason="pip install 'longctx[ray]' (make test installs it)")
    from longctx.config import ConfigError
    from longctx.launch.ray_launcher import _rank_error

    def raised(exc):
        try:
            raise exc
        except Exception as e:  # noqa: BLE001 - a traceback of its own, as a worker's would have
            return e

    error = _rank_error(ray_train.WorkerGroupError("2 workers failed", {
        1: raised(ValueError("a bug")), 0: raised(ConfigError("checkpoint.dir holds another run"))}))
    assert (error.rank, error.remote_type) == (0, "ConfigError")
    assert error.remote_message == "checkpoint.dir holds another run"
    assert "raise exc" in error.remote_traceback
    # a peer's closed connection is an echo of the failure, not the failure, at any rank
    echo = _rank_error(ray_train.WorkerGroupError("2 workers failed", {
        0: raised(RuntimeError("[gloo] Connection closed by peer")), 1: raised(ConfigError("bad data.path"))}))
    assert (echo.rank, echo.remote_type) == (1, "ConfigError")
    bug = _rank_error(ray_train.WorkerGroupError("1 worker failed", {0: raised(KeyError("x"))}))
    assert bug.remote_type == "KeyError" and "KeyError" in str(bug)
    # as Ray delivers it: unpickled, no __traceback__; the worker's traceback is in the group error's text
    import pickle

    shipped = pickle.loads(pickle.dumps(raised(KeyError("y"))))
    text = 'Traceback (most recent call last):\n  File "train.py", line 3, in step\nKeyError: \'y\''
    bug = _rank_error(ray_train.WorkerGroupError(text, {0: shipped}))
    assert shipped.__traceback__ is None and 'File "train.py", line 3, in step' in bug.remote_traceback
    other = RuntimeError("the controller died")
    assert _rank_error(other) is other

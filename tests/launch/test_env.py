"""The epoch handshake that keeps a restarted torchrun attempt from reading a dead attempt's addresses:
every rank of an attempt agrees on one epoch no earlier attempt used, whatever the dead attempts left in the
store and however far they got."""

import threading

import pytest
import torch.distributed as dist

from longctx.launch.env import fresh_epoch


def _attempt(store, world, order, timeout_s=10.0):
    """Run fresh_epoch on every rank of one attempt (threads, ranks started in `order`); the epochs."""
    epochs, errors = {}, []

    def rank_main(rank):
        try:
            epochs[rank] = fresh_epoch(store, rank, world, timeout_s, max_delay_s=0.02)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return epochs


def test_every_attempt_agrees_on_an_unused_epoch():
    store = dist.HashStore()
    seen = set()
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):  # followers first: they read a stale "current"
        epochs = _attempt(store, 4, order)
        assert len(set(epochs.values())) == 1 and len(epochs) == 4, epochs
        assert not seen & set(epochs.values())
        seen |= set(epochs.values())


def test_leftovers_of_a_dead_attempt_are_not_taken_for_this_one():
    store = dist.HashStore()
    _attempt(store, 3, [0, 1, 2])  # a whole attempt
    # a dead attempt: rank 0 opened epoch 2 and died before answering; rank 1 had posted to it
    store.add("longctx/epoch", 1)
    store.set("longctx/current", "2")
    store.set("longctx/2/start/1", str(store.add("longctx/starts/1", 1)))
    epochs = _attempt(store, 3, [2, 1, 0])
    assert set(epochs.values()) == {3}
    # a world of one needs nobody
    assert fresh_epoch(store, 0, 1, 1.0) == 4


def test_a_missing_rank_times_out_with_a_message():
    store = dist.HashStore()
    with pytest.raises(TimeoutError, match=r"rank 1: rank 0 did not open.*parallel.timeout_s=0.2"):
        fresh_epoch(store, 1, 2, 0.2, max_delay_s=0.02)  # no rank 0 ever
    with pytest.raises(TimeoutError, match=r"rank 0: the other 1 rank\(s\).*parallel.timeout_s=0.2"):
        fresh_epoch(dist.HashStore(), 0, 2, 0.2)
    store.set("longctx/current", "7")  # a rank 0 that opened an epoch and never answered
    with pytest.raises(TimeoutError, match="rank 1: rank 0 did not open"):
        fresh_epoch(store, 1, 2, 0.3, max_delay_s=0.02)


def _torchrun_env(monkeypatch, **env):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, r"RANK=0 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not: "
                                       r"run under torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, r"but MASTER_PORT is not: .*set MASTER_ADDR"),
    ({"RANK": "0", "WORLD_SIZE": "abc"}, r"^WORLD_SIZE='abc' is not an integer: run under torchrun"),
    ({"RANK": "x", "WORLD_SIZE": "2"}, r"^RANK='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "gpu0"}, r"^LOCAL_RANK='gpu0' is not an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK=2 is outside WORLD_SIZE=2 \(ranks are 0..1\)"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, r"WORLD_SIZE=0 must be >= 1"),
    ({"WORLD_SIZE": "2"}, r"^WORLD_SIZE=2 is set but RANK is not: run under torchrun"),
    ({"RANK": "1"}, r"^RANK=1 is set but WORLD_SIZE is not: run under torchrun"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "p"}, r"^MASTER_PORT='p' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, r"MASTER_PORT=70000 is not a TCP"),
])
def test_a_bad_torchrun_environment_is_named_before_the_rendezvous(monkeypatch, env, message):
    from longctx.config import ConfigError
    from longctx.launch.env import check_env_rendezvous, process_group

    _torchrun_env(monkeypatch, **env)
    with pytest.raises(ConfigError, match=message):
        check_env_rendezvous()
    assert not dist.is_initialized()
    with pytest.raises(ConfigError, match=message), process_group(timeout_s=5):  # not torch's traceback or a wait
        pass
    assert not dist.is_initialized()


def test_a_complete_torchrun_environment_passes(monkeypatch):
    from longctx.launch.env import check_env_rendezvous

    _torchrun_env(monkeypatch, RANK="1", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT="29500")
    assert check_env_rendezvous() == 0
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert check_env_rendezvous() == 1


def test_a_rendezvous_without_its_peers_is_one_line_naming_the_address(monkeypatch):
    import socket

    from longctx.config import ConfigError
    from longctx.launch.env import process_group

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for rank in ("0", "1"):  # rank 0 serves the store and waits for rank 1; rank 1 finds no store
        _torchrun_env(monkeypatch, RANK=rank, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with pytest.raises(ConfigError, match=rf"^rank {rank} of 2: the rendezvous at MASTER_ADDR:MASTER_PORT="
                                              rf"127.0.0.1:{port} failed within parallel.timeout_s=2 .*start every "
                                              r"rank"), process_group(timeout_s=2):
            pass
        assert not dist.is_initialized()


def test_a_rendezvous_wait_ends_on_a_stop_signal_and_at_a_store_that_never_answers(tmp_path):
    """Waits inside torch, where Python runs no signal handler: a rank whose MASTER_PORT is held by a program that
    accepts and never answers ends with the one-line error (it waited forever, SIGTERM included), and a rank 0
    waiting for its peers ends on SIGTERM at once with 128 + 15 (it waited out parallel.timeout_s, then said 2)."""
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import psutil

    from ._jobs import TINY

    silent, held = socket.socket(), []
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepting = threading.Thread(target=lambda: held.append(silent.accept()), daemon=True)
    accepting.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    argv = [sys.executable, "-m", "longctx", "train", TINY, "train.steps=1", "logging.quiet=true",
            "logging.tensorboard=false", f"run_dir={tmp_path / 'run'}"]

    def env(rank, port):
        return dict(os.environ, RANK=rank, WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(port))

    try:
        r = subprocess.run([*argv, "parallel.timeout_s=2"], env=env("1", silent.getsockname()[1]),
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2, r.stderr[-2000:]
        assert r.stderr.strip().splitlines()[-1].startswith(
            f"longctx: error: rank 1 of 2: the rendezvous at MASTER_ADDR:MASTER_PORT=127.0.0.1:"
            f"{silent.getsockname()[1]} failed within parallel.timeout_s=2 (no answer from the store there)"), r.stderr
        waiting = subprocess.Popen([*argv, "parallel.timeout_s=300"], env=env("0", free), stderr=subprocess.PIPE,
                                   text=True)
        try:
            proc, deadline = psutil.Process(waiting.pid), time.monotonic() + 90
            while not any(c.laddr.port == free and c.status == psutil.CONN_LISTEN for c in proc.net_connections()):
                assert waiting.poll() is None and time.monotonic() < deadline, waiting.stderr.read()[-2000:]
                time.sleep(0.1)
            time.sleep(0.5)  # into the wait for rank 1
            waiting.send_signal(signal.SIGTERM)
            err = waiting.communicate(timeout=60)[1]  # not parallel.timeout_s's 300
        finally:
            waiting.kill()
            waiting.wait()
        assert waiting.returncode == 128 + signal.SIGTERM, err[-2000:]
        assert err.strip().splitlines()[-1] == "longctx: stopped by SIGTERM during the rendezvous, before any step"
        assert not (tmp_path / "run").exists()
    finally:
        silent.close()
        for conn, _ in held:
            conn.close()


def test_longctx_train_names_the_variable_in_one_line(monkeypatch, capsys):
    from longctx.cli import main

    from ._jobs import TINY

    _torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="2")
    assert main(["train", TINY, "train.steps=1", "logging.quiet=true", "logging.tensorboard=false"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error: RANK=0 and WORLD_SIZE=2 are set but MASTER_ADDR and MASTER_PORT are not")
    assert len(err.strip().splitlines()) == 1
    _torchrun_env(monkeypatch, RANK="0", WORLD_SIZE="abc")  # read first by world_size_from_env
    assert main(["train", TINY, "train.steps=1"]) == 2
    assert capsys.readouterr().err.startswith("longctx: error: WORLD_SIZE='abc' is not an integer: run under torchrun")
    # half of a launcher's environment: validating for WORLD_SIZE and then training alone was the alternative
    _torchrun_env(monkeypatch, WORLD_SIZE="2")
    assert main(["train", TINY, "train.steps=1", "parallel.cp=2"]) == 2
    assert capsys.readouterr().err.startswith("longctx: error: WORLD_SIZE=2 is set but RANK is not")
    _torchrun_env(monkeypatch)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "two")
    assert main(["train", TINY, "train.steps=1"]) == 2
    assert capsys.readouterr().err.startswith("longctx: error: LOCAL_WORLD_SIZE='two' is not an integer")


def test_the_cuda_device_of_a_local_rank(monkeypatch):
    from longctx.config import ConfigError
    from longctx.launch.env import cuda_device

    assert [cuda_device(r, 8) for r in (0, 7)] == [0, 7]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5")
    assert cuda_device(5, 1) == 0  # srun --gpus-per-task=1: each process sees its own one device
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=1 but this process sees 1 CUDA devices"):
        cuda_device(1, 1)  # two processes on a one-GPU node: not both on device 0
    with pytest.raises(ConfigError, match=r"LOCAL_RANK=5 but this process sees 4 CUDA devices.*"
                                          r"--nproc-per-node 4"):
        cuda_device(5, 4)
    # an env:// launcher that sets RANK and WORLD_SIZE but no LOCAL_RANK (mpirun, a script of one's own)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(ConfigError, match=r"WORLD_SIZE is set but LOCAL_RANK is not, and this process sees 4 CUDA "
                                          r"devices: every rank of the node would take device 0; set LOCAL_RANK"):
        cuda_device(0, 4)
    assert cuda_device(0, 1) == 0  # one device each: nothing to choose
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert cuda_device(1, 4) == 1


def test_an_agent_gone_before_the_rank_watches_still_stops_it():
    """torchrun's agent killed while its rank still imported torch: the rank's parent is then the reaper, which
    watch_agent took for the agent (the rank trained on alone). It watches the parent noted at start instead."""
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "from longctx import _signals\n"
            "_signals.PARENT_AT_START = -5  # an agent that is gone: getppid() is no longer it\n"
            "os.environ['TORCHELASTIC_RUN_ID'] = 'test'\n"
            "got = []\n"
            "signal.signal(signal.SIGTERM, lambda *a: got.append('SIGTERM'))\n"
            "from longctx.launch.env import watch_agent\n"
            "watch_agent(poll_s=0.05)\n"
            "deadline = time.time() + 20\n"
            "while not got and time.time() < deadline:\n"
            "    time.sleep(0.05)\n"
            "print(got)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "['SIGTERM']", out.stdout + out.stderr[-2000:]

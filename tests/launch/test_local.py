import os
import pickle
import time

import psutil
import pytest
import torch

from longctx.launch import RankError, rank_info, run
from tests.launch import _workers


def _descendants():
    return {p.pid: p for p in psutil.Process().children(recursive=True)}


@pytest.fixture(scope="module")
def _forkserver_running():
    # The forkserver and multiprocessing's resource tracker outlive run() by design; starting them
    # here puts them in every test's "before" snapshot.
    run(_workers.noop, 1)


@pytest.fixture(autouse=True)
def no_leftover_processes(_forkserver_running):
    before = set(_descendants())
    yield
    # Forkserver ranks are reaped by the server asynchronously, so allow a moment.
    deadline = time.monotonic() + 5.0
    while True:
        leftover = {pid: p for pid, p in _descendants().items() if pid not in before}
        if not leftover or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leftover, f"processes left behind: {[(p.pid, p.name()) for p in leftover.values()]}"


def _assert_gone(pids):
    deadline = time.monotonic() + 5.0
    while any(psutil.pid_exists(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in pids if psutil.pid_exists(pid)]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_results_come_back_in_rank_order(world_size):
    results = run(_workers.report, world_size)
    expected_sum = world_size * (world_size + 1) / 2
    assert [r["rank"] for r in results] == list(range(world_size))
    pids = set()
    for rank, r in enumerate(results):
        assert r["world_size"] == world_size
        assert isinstance(r["sum"], torch.Tensor) and r["sum"].item() == expected_sum
        assert r["threads"] == 1
        env = r["env"]
        assert env["RANK"] == env["LOCAL_RANK"] == str(rank)
        assert env["WORLD_SIZE"] == env["LOCAL_WORLD_SIZE"] == str(world_size)
        assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0
        pids.add(r["pid"])
    assert len(pids) == world_size and os.getpid() not in pids
    _assert_gone(pids)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_other_start_methods(start_method):
    results = run(_workers.report, 2, start_method=start_method)
    assert [r["sum"].item() for r in results] == [3.0, 3.0]
    _assert_gone([r["pid"] for r in results])


@pytest.mark.timeout(30)
def test_args_kwargs_env_and_threads(monkeypatch):
    # Set after the forkserver started: ranks must still see the caller's current environment.
    monkeypatch.setenv("LONGCTX_TEST_VAR", "from-parent")
    results = run(_workers.report, 2, args=(2.0,), kwargs={"tag": "hello"}, num_threads=2)
    assert [r["sum"].item() for r in results] == [6.0, 6.0]
    assert all(r["tag"] == "hello" and r["threads"] == 2 for r in results)
    assert all(r["env"]["LONGCTX_TEST_VAR"] == "from-parent" for r in results)

    results = run(_workers.report, 1, env={"LONGCTX_TEST_VAR": "override", "GLOO_SOCKET_IFNAME": "lo"})
    assert results[0]["env"]["LONGCTX_TEST_VAR"] == "override"
    assert results[0]["env"]["GLOO_SOCKET_IFNAME"] == "lo"


@pytest.mark.timeout(30)
def test_nested_tensors_come_back_intact():
    results = run(_workers.nested_tensors, 2)
    for rank, r in enumerate(results):
        base = torch.arange(6, dtype=torch.float32).reshape(2, 3) + rank
        assert r["rank"] == rank
        outer = r["outer"]
        torch.testing.assert_close(outer["list"][0], base)
        torch.testing.assert_close(outer["list"][1][0], base * 2)
        assert outer["list"][1][1:] == ("text", 3)
        assert list(outer["ordered"]) == ["a", "b"] and type(outer["ordered"]).__name__ == "OrderedDict"
        assert outer["ordered"]["a"].item() == rank and outer["ordered"]["b"] is None
        assert not outer["grad"].requires_grad
        torch.testing.assert_close(outer["grad"], base)
        assert outer["half"].dtype == torch.float16


@pytest.mark.timeout(30)
def test_exception_on_one_rank_raises_rank_error():
    with pytest.raises(RankError) as info:
        run(_workers.fail_on_rank, 3, args=(1,))
    err = info.value
    assert err.rank == 1
    assert err.remote_type == "ValueError"
    assert "fail_on_rank" in err.remote_traceback and "boom" in err.remote_traceback
    message = str(err)
    assert message.startswith("rank 1 failed with ValueError: boom")
    assert "fail_on_rank" in message


@pytest.mark.timeout(40)
def test_rank_that_skips_a_collective_fails_within_timeout():
    start = time.monotonic()
    with pytest.raises((RankError, TimeoutError)) as info:
        run(_workers.skip_collective_on_rank0, 3, timeout=10, pg_timeout=5)
    assert time.monotonic() - start < 30
    message = str(info.value)
    if isinstance(info.value, RankError):
        assert info.value.rank in (1, 2)
        assert "rank(s) [0]" in message and "pg_timeout" in message
    else:
        assert "[0]" in message and "timeout=" in message


@pytest.mark.timeout(30)
def test_dead_rank_is_reported_quickly():
    start = time.monotonic()
    with pytest.raises(RankError, match="rank 2 died with exit code 3") as info:
        run(_workers.exit_on_rank, 3, args=(2, 3))
    assert time.monotonic() - start < 20
    assert info.value.rank == 2 and info.value.exitcode == 3


@pytest.mark.timeout(60)
def test_a_dead_fork_rank_is_reported_with_its_exit_code():
    # a forked child's pipe closes as it exits, a moment before waitpid reports it: the launcher waits for the code
    # (it read None under load, and the report then failed on the missing message)
    for _ in range(5):
        with pytest.raises(RankError, match="rank 1 died with exit code 3") as info:
            run(_workers.exit_on_rank, 2, args=(1, 3), start_method="fork")
        assert info.value.exitcode == 3


def test_a_rank_whose_exit_code_is_unknown_is_still_reported():
    from longctx.launch.rank_errors import rank_error

    error = rank_error([(1, None, None, None, None), (0, "DistNetworkError", "Connection closed by peer", "tb", None)],
                       set())
    assert error.rank == 1 and str(error).startswith("rank 1 ended before returning, exit code unknown")


@pytest.mark.timeout(30)
def test_a_segfaulting_rank_is_reported_with_its_python_stack():
    # No exception and no message: only faulthandler's record says where the rank died.
    with pytest.raises(RankError, match="rank 1 died with exit code -11 \\(SIGSEGV\\)") as info:
        run(_workers.segfault_on_rank, 3, args=(1,))
    err = info.value
    assert err.rank == 1 and err.exitcode == -11
    assert "Segmentation fault" in err.remote_traceback
    assert "segfault_on_rank" in err.remote_traceback and "segfault_on_rank" in str(err)


@pytest.mark.timeout(30)
def test_wall_clock_timeout_kills_ranks():
    start = time.monotonic()
    with pytest.raises(TimeoutError) as info:
        run(_workers.sleep_forever, 2, timeout=2)
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert "[0, 1]" in message and "timeout=" in message and "2 s" in message


@pytest.mark.timeout(60)
def test_a_timeout_beyond_what_poll_takes_and_a_stop_signal_the_ranks_die_of(tmp_path, capsys):
    """A timeout past ~24.8 days (poll()'s 2**31 ms) is waited in pieces, not an OverflowError; SIGTERM to the
    launcher, passed on to ranks that do not handle it, ends it as the ranks ended (exit 143 and one line),
    not with a dead-rank report that reads as a bug."""
    import signal
    import threading

    assert run(_workers.noop, 2, timeout=3e6) == [None, None]

    def stop_once_started():
        deadline = time.monotonic() + 50
        while time.monotonic() < deadline and len(os.listdir(tmp_path)) < 2:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_once_started, daemon=True).start()
    with pytest.raises(SystemExit) as stopped:
        run(_workers.say_started_then_sleep, 2, args=(str(tmp_path),), timeout=55)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by SIGTERM, passed on to the ranks, which ended on it" in capsys.readouterr().err


@pytest.mark.timeout(60)
def test_at_the_timeout_stop_grace_lets_the_ranks_end_their_work(tmp_path):
    with pytest.raises(TimeoutError, match=r"timed out after 2 s: its ranks were sent SIGTERM and given 20 s to end$"):
        run(_workers.finish_slowly_on_sigterm, 2, args=(str(tmp_path),), timeout=2, stop_grace=20)
    assert sorted(os.listdir(tmp_path)) == ["rank0", "rank1"]
    with pytest.raises(TimeoutError, match=r"given 1 s to end; rank\(s\) \[0, 1\] had not and were killed"):
        run(_workers.finish_slowly_on_sigterm, 2, args=(str(tmp_path / "none"),), timeout=2, stop_grace=1)


@pytest.mark.timeout(10)
def test_unpicklable_fn_is_rejected_before_starting():
    def nested():
        return 1

    for fn in (lambda: 1, nested):
        with pytest.raises(TypeError, match="fn=.*module level"):
            run(fn, 2)


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("kwargs", "exc", "word"),
    [
        ({"world_size": 0}, ValueError, "world_size"),
        ({"world_size": -1}, ValueError, "world_size"),
        ({"world_size": 1.5}, ValueError, "world_size"),
        ({"world_size": True}, ValueError, "world_size"),
        ({"backend": "mpi"}, ValueError, "backend"),
        ({"start_method": "thread"}, ValueError, "start_method"),
        ({"timeout": 0}, ValueError, "timeout"),
        ({"timeout": float("inf")}, ValueError, "timeout"),
        ({"pg_timeout": -1}, ValueError, "pg_timeout"),
        ({"stop_grace": 0}, ValueError, "stop_grace"),
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"env": {"A": 1}}, TypeError, "env"),
        ({"args": (lambda: 0,)}, TypeError, "args"),
    ],
)
def test_bad_arguments(kwargs, exc, word):
    call = {"world_size": 1, **kwargs}
    world_size = call.pop("world_size")
    with pytest.raises(exc, match=word):
        run(_workers.noop, world_size, **call)


@pytest.mark.timeout(10)
def test_nccl_without_enough_gpus():
    # One more rank than there are devices always fails, GPUs or not (CPU builds lack NCCL).
    with pytest.raises(RuntimeError, match="nccl"):
        run(_workers.noop, torch.cuda.device_count() + 1, backend="nccl")
    with pytest.raises(ValueError, match="fork"):
        run(_workers.noop, 1, backend="nccl", start_method="fork")


def test_rank_info_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        rank_info()


def test_rank_error_pickles():
    err = RankError("rank 3 failed with X: y", 3, "X", "tb")
    copy = pickle.loads(pickle.dumps(err))
    assert (copy.rank, copy.remote_type, copy.remote_traceback, str(copy)) == (3, "X", "tb", str(err))


def test_a_killed_launchers_crash_directory_is_removed_by_the_next(tmp_path, monkeypatch):
    """A launcher killed outright leaves its rank crash-stack directory (named by its pid); the next run()
    removes those of launchers that are gone, and leaves a live one's alone."""
    import subprocess
    import sys
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / f"longctx-ranks-{gone.stdout.strip()}-abc"
    alive = tmp_path / f"longctx-ranks-{os.getpid()}-def"
    other = tmp_path / "longctx-ranks-notapid"
    for d in (dead, alive, other):
        d.mkdir()
    run(_workers.noop, 1, timeout=60)
    assert not dead.exists() and alive.exists() and other.exists()


def test_ranks_given_different_configs_are_refused_naming_the_keys(tmp_path):
    """Under torchrun each node reads its own command line: another train.lr on one node trained silently to
    other losses. Every rank's config is compared before anything is built."""
    run_dir = f"run_dir={tmp_path}"
    with pytest.raises(RankError, match=r"ConfigError: the ranks were started with different configs \(train.lr=0.003 "
                                        r"on rank 0 but 0.03 on rank 1\); give every node the same config file"):
        run(_workers.train_with_rank_overrides, 2, args=([[run_dir], [run_dir, "train.lr=0.03"]],), timeout=120)

"""The process group a `longctx train` finds: the harness's, Ray Train's, torchrun's, or a single process's.

  already initialised   the simulated-cluster harness (longctx.launch.run) or a Ray Train worker: use it
  RANK / WORLD_SIZE set torchrun (or any env:// launcher): initialise from the environment, tear down after
  neither               one process: a world of one over an in-memory store (no port is opened)

Under torchrun every attempt of the job gets its own key prefix in the rendezvous store (`fresh_epoch`).
torch elastic keeps the agent's store across `--max-restarts` attempts while the env:// rendezvous assumes a
fresh one, so without it a restarted group reads the dead attempt's gloo/NCCL addresses and fails
(`connectFullMesh ... Connection refused`) or hangs. TORCHELASTIC_RESTART_COUNT cannot be the prefix: it
counts one agent's own failures, and an agent that restarts because another node failed does not count it,
so two nodes can disagree on it.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from .._signals import STOP_SIGNALS
from ..config import ConfigError


def _backend() -> str:
    # gloo for CPU tensors always (metrics, object broadcasts); NCCL for CUDA tensors when there is a GPU
    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"


@contextlib.contextmanager
def process_group(timeout_s: float = 600.0):
    """Yield with a default process group; destroy it afterwards only if it was created here."""
    if dist.is_initialized():
        yield
        return
    timeout = timedelta(seconds=timeout_s)
    if env_world() is not None:
        local_rank = check_env_rendezvous()  # one line, not torch's rendezvous traceback (or a wait)
        watch_agent()
        if torch.cuda.is_available():
            torch.cuda.set_device(cuda_device(local_rank, torch.cuda.device_count()))

        def failed(why: str) -> str:
            where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
            return (f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: the rendezvous at MASTER_ADDR:"
                    f"MASTER_PORT={where} failed within parallel.timeout_s={timeout_s:g} ({why}); start every rank "
                    "(torchrun on every node) against the same address, or raise parallel.timeout_s")

        try:
            with waiting_in_torch(timeout_s + RENDEZVOUS_GRACE_S, failed("no answer from the store there")):
                store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
                epoch = fresh_epoch(store, rank, world_size, timeout_s)
        except (dist.DistError, TimeoutError) as e:  # a peer that never came, an unreachable MASTER_ADDR
            raise ConfigError(failed(str(e).splitlines()[0][:200])) from None
        store = dist.PrefixStore(f"longctx/epoch_{epoch}", store)
        dist.init_process_group(_backend(), store=store, rank=rank, world_size=world_size, timeout=timeout)
    else:
        if torch.cuda.is_available():
            torch.cuda.set_device(0)
        dist.init_process_group(_backend(), store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    try:
        yield
        if dist.get_world_size() > 1:
            # No rank tears down while a peer's last collective may still run: a gloo worker thread left
            # holding finished work when the interpreter exits takes the GIL during finalisation and aborts
            # the process (std::terminate) after a successful run, which torchrun reports as a failed job.
            dist.barrier()
    finally:
        from ..parallel.comm import Comm

        dist.destroy_process_group()
        Comm.forget()
        gc.collect()  # the sub-groups' meshes, while the interpreter is whole (not at its exit)


# past its own timeout, torch's store client still waits for a server that accepted and never answers (another
# program on a stale MASTER_PORT): the watcher below ends that wait this much later
RENDEZVOUS_GRACE_S = 5.0


@contextlib.contextmanager
def waiting_in_torch(limit_s: float, failure: str):
    """While the main thread waits inside torch's C++ (the rendezvous), where Python runs no signal handler
    until the call returns: a watcher thread ends the process on a stop signal or Ctrl-C, with 128 + its number
    (nothing has run that a checkpoint could keep), and after `limit_s` with `failure` as the one-line error
    (exit 2). Signals reach it through the interpreter's wakeup fd, written by the C-level handler at once;
    only the main thread can set that fd, so elsewhere only the time limit is watched."""
    import select
    import sys

    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False) if in_main else None
    done = threading.Event()
    watched = {int(s) for s in (*STOP_SIGNALS, signal.SIGINT)}

    def watch():
        deadline = time.monotonic() + limit_s
        while not done.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                print(f"longctx: error: {failure}", file=sys.stderr, flush=True)
                os._exit(2)
            if select.select([read_end], [], [], left)[0]:  # a signal, or the end of the wait, writes to it
                for signum in os.read(read_end, 64):
                    if signum in watched and not done.is_set():
                        print(f"longctx: stopped by {signal.Signals(signum).name} during the rendezvous, before "
                              "any step", file=sys.stderr, flush=True)
                        os._exit(128 + signum)

    watcher = threading.Thread(target=watch, name="longctx-rendezvous-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        os.write(write_end, b"\0")  # wakes the watcher now (0 is no signal's number)
        watcher.join()
        if in_main:
            signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)


_watching = []  # the agent's pid, once this process watches it


def watch_agent(poll_s: float = 1.0) -> None:
    """Under torchrun, a daemon thread that sends this rank SIGTERM once its agent is gone (its parent changes),
    as launch local's lifeline does: a Trainer then checkpoints the step in flight and stops. Torch elastic
    starts each rank in a session of its own, so an agent killed (SIGKILL, an OOM kill, or SIGUSR1, which it
    does not handle) takes no rank with it, and the ranks would go on training with no one to stop them."""
    from .._signals import PARENT_AT_START

    if not os.environ.get("TORCHELASTIC_RUN_ID") or _watching:
        return
    # the parent when the process started: an agent killed while this rank imported torch and checked its config
    # has been replaced by the reaper already, which would then be watched in its place
    agent = PARENT_AT_START
    _watching.append(agent)

    def watch():
        while os.getppid() == agent:
            time.sleep(poll_s)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="longctx-agent-watch", daemon=True).start()


def fresh_epoch(store, rank: int, world_size: int, timeout_s: float, max_delay_s: float = 0.5) -> int:
    """A number every rank of this attempt agrees on and no earlier attempt used, agreed through `store`,
    which may hold any part of this handshake from attempts whose processes have all exited (torch elastic
    stops every worker before the next attempt starts).

    Rank 0 draws a new epoch (an atomic counter), publishes it as current and waits for every other rank's
    start number under it. Every other rank draws a start number of its own (also a counter, so never seen
    before), posts it under the current epoch it reads (perhaps a dead attempt's) and looks for rank 0's
    answer, the start numbers of that epoch. An answer that lists its own start number can only come from
    this attempt's rank 0; none yet, or another's, means the epoch may be stale: read it again. Rank 0 blocks
    in the store; the others check with a backoff up to `max_delay_s` (a timed-out store wait logs a warning
    each time). Everything is bounded by `timeout_s`."""
    deadline = time.monotonic() + timeout_s

    def fail(what: str):
        return TimeoutError(f"{what} within parallel.timeout_s={timeout_s:g}; is every rank running?")

    if rank == 0:
        epoch = store.add("longctx/epoch", 1)
        store.set("longctx/current", str(epoch))
        keys = [f"longctx/{epoch}/start/{r}" for r in range(1, world_size)]
        if keys:
            try:
                store.wait(keys, timedelta(seconds=timeout_s))
            except dist.DistStoreError:
                raise fail(f"rank 0: the other {world_size - 1} rank(s) did not reach the rendezvous store") from None
        store.set(f"longctx/{epoch}/go", json.dumps({k.rsplit("/", 1)[1]: store.get(k).decode() for k in keys}))
        return epoch
    start = str(store.add(f"longctx/starts/{rank}", 1))
    posted, delay = set(), 0.005
    while True:
        if store.check(["longctx/current"]):
            epoch = int(store.get("longctx/current"))
            if epoch not in posted:
                store.set(f"longctx/{epoch}/start/{rank}", start)
                posted.add(epoch)
            go = f"longctx/{epoch}/go"
            if store.check([go]) and json.loads(store.get(go)).get(str(rank)) == start:
                return epoch
        if time.monotonic() > deadline:
            raise fail(f"rank {rank}: rank 0 did not open this attempt's epoch in the rendezvous store")
        time.sleep(delay)
        delay = min(2 * delay, max_delay_s)


def _env_int(name: str, default: int | None = None, *, fix: str) -> int | None:
    """The integer environment variable `name` (`default` if unset); a ConfigError naming it otherwise."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not an integer: {fix}") from None


_UNDER_TORCHRUN = "run under torchrun (it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)"
_OR_ALONE = f"{_UNDER_TORCHRUN}, or unset RANK and WORLD_SIZE to train in one process"


def check_env_rendezvous() -> int:
    """Check the env:// variables before torch reads them (its errors are tracebacks, and a rank outside the
    world waits for the store until parallel.timeout_s); returns LOCAL_RANK (0 if unset)."""
    fix = _OR_ALONE
    found = env_world()
    if found is None:
        raise ConfigError(f"RANK and WORLD_SIZE are not set: {_UNDER_TORCHRUN}")
    rank, world_size = found
    local_rank = _env_int("LOCAL_RANK", 0, fix=fix)
    if not 0 <= rank < world_size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={world_size} (ranks are 0..{world_size - 1}): {fix}")
    if local_rank < 0:
        raise ConfigError(f"LOCAL_RANK={local_rank} must be >= 0: {fix}")
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise ConfigError(
            f"RANK={rank} and WORLD_SIZE={world_size} are set but {' and '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not: run under torchrun, which sets them all (`torchrun "
            "--nproc-per-node N -m longctx train CONFIG`), or set MASTER_ADDR and MASTER_PORT to rank 0's host "
            "and a free port, or unset RANK and WORLD_SIZE to train in one process")
    port = _env_int("MASTER_PORT", fix=f"set it to a free TCP port on rank 0's host, or {_UNDER_TORCHRUN}")
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT={port} is not a TCP port (1..65535): set it to a free port on rank 0's host")
    return local_rank


def cuda_device(local_rank: int, visible: int) -> int:
    """The CUDA device of the process with `local_rank` on its node, which sees `visible` devices: its own
    LOCAL_RANK-th, or the one device a launcher that narrows CUDA_VISIBLE_DEVICES to one per process (`srun
    --gpus-per-task=1`) left it. More processes than devices is a ConfigError (torch's is "invalid device
    ordinal", a traceback; two ranks on one GPU, NCCL's duplicate-GPU error)."""
    if "LOCAL_RANK" not in os.environ and visible > 1 and (env_world() or (0, 1))[1] > 1:
        raise ConfigError(f"WORLD_SIZE is set but LOCAL_RANK is not, and this process sees {visible} CUDA devices: "
                          "every rank of the node would take device 0; set LOCAL_RANK (torchrun does), or give each "
                          "process its own device (CUDA_VISIBLE_DEVICES, srun --gpus-per-task=1)")
    if local_rank < visible:
        return local_rank
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible == 1 and shown is not None and len([d for d in shown.split(",") if d.strip()]) == 1:
        return 0
    raise ConfigError(f"LOCAL_RANK={local_rank} but this process sees {visible} CUDA devices"
                      f"{f' (CUDA_VISIBLE_DEVICES={shown})' if shown is not None else ''}: start at most {visible} "
                      f"processes per node (torchrun --nproc-per-node {visible}), or give each process its own device")


def env_world() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) an env:// launcher such as torchrun set, or None where neither is set (one process).
    One without the other is a ConfigError: half a launcher's environment (a stale export, say) must neither
    train alone after validating for another world size nor end in int()'s traceback."""
    fix = _OR_ALONE
    rank, world_size = _env_int("RANK", fix=fix), _env_int("WORLD_SIZE", fix=fix)
    if rank is None and world_size is None:
        return None
    if rank is None or world_size is None:
        given, missing = ("RANK", "WORLD_SIZE") if world_size is None else ("WORLD_SIZE", "RANK")
        raise ConfigError(f"{given}={os.environ[given]} is set but {missing} is not: {fix}")
    if world_size < 1:
        raise ConfigError(f"WORLD_SIZE={world_size} must be >= 1: {fix}")
    return rank, world_size


def env_rank() -> int:
    """This process's rank under an env:// launcher, 0 for one process on its own."""
    found = env_world()
    return found[0] if found else 0


def local_world_size(default: int) -> int:
    """LOCAL_WORLD_SIZE (ranks on this node, as torchrun sets it), else `default`."""
    value = _env_int("LOCAL_WORLD_SIZE", default, fix=f"set it to the ranks per node, or {_UNDER_TORCHRUN}")
    if value < 1:
        raise ConfigError(f"LOCAL_WORLD_SIZE={value} must be >= 1: set it to the ranks per node, or {_UNDER_TORCHRUN}")
    return value


def world_size_from_env() -> int:
    """The world size `longctx train` will find (before any group exists): for validating a config early."""
    if dist.is_initialized():
        return dist.get_world_size()
    found = env_world()
    return found[1] if found else 1

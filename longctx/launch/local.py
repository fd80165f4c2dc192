"""Simulated cluster: run a function on W ranks as local processes, each inside a process group.

Every multi-rank test goes through :func:`run`, so it favours fast start-up (a forkserver that has
already imported torch), loud failures (the remote traceback of the rank that actually broke) and
never leaving processes behind.
"""

from __future__ import annotations

import copy
import faulthandler
import multiprocessing as mp
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

from .._signals import STOP_SIGNALS, ForwardingScope, record_from_start
from . import forkserver
from .rank_errors import RankError, crash_stack, rank_error

__all__ = ["RankError", "rank_info", "run"]

_HOST = "127.0.0.1"
_BACKENDS = ("auto", "gloo", "nccl")
_START_METHODS = ("fork", "forkserver", "spawn")
# After the first failure the other ranks get this long to report theirs, so that the root cause can
# be preferred over the connection errors it sets off in its peers.
_FAILURE_GRACE_S = 1.0
_EXIT_GRACE_S = 5.0  # for ranks that returned to tear down on their own before SIGTERM
_KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL

_contexts: dict[str, mp.context.BaseContext] = {}


def rank_info() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group of the calling process."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("rank_info() needs an initialised default process group; call it from a "
                           "function started by longctx.launch.local.run()")
    return dist.get_rank(), dist.get_world_size()


def run(fn, world_size, *, args=(), kwargs=None, backend="auto", timeout=120.0, pg_timeout=None,
        start_method="forkserver", num_threads=1, env=None, record_stops=False, stop_grace=None) -> list:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` ranks and return their results, index = rank.

    Each rank is a separate process in which ``torch.distributed`` is already initialised (gloo on
    CPU; ``backend="auto"`` picks nccl when there is one CUDA device per rank). ``fn``, ``args`` and
    ``kwargs`` must be picklable, so ``fn`` has to be defined at module level. Tensors in the result
    (inside lists, tuples and dicts) come back detached and on the CPU.

    ``timeout`` is a hard wall-clock limit on the whole call: past it every rank is killed and
    ``TimeoutError`` is raised; with ``stop_grace`` the ranks first get SIGTERM and this many seconds to
    end (a Trainer checkpoints the step in flight) before they are killed. ``pg_timeout`` (default
    ``min(60, timeout / 2)``) is the process group's collective timeout, so that a collective some rank
    never joins raises in the others before the hard limit. A rank that raises or dies makes ``run`` raise
    :class:`RankError`.

    ``record_stops``: each rank records SIGTERM / SIGUSR1 from its start for the training loop that ``fn`` runs
    (longctx._signals.record_from_start) instead of dying of one before the loop listens.

    ``env`` entries are set in every rank on top of the caller's current environment. The forkserver has
    imported torch, triton and the trainer before they are set (see longctx.launch.forkserver): where they
    change a variable one of those reads at import (TRITON_INTERPRET, say), this launch's ranks start by
    spawn instead, which sees it. Ranks may start processes of their own (DataLoader workers); the ranks are
    not daemonic, so this call's own cleanup (terminate, then kill) is what ends them on any exit.
    """
    kwargs = {} if kwargs is None else dict(kwargs)
    _check_args(fn, world_size, backend, timeout, pg_timeout, start_method, num_threads, env)
    if stop_grace is not None and not _is_seconds(stop_grace):
        raise ValueError(f"stop_grace must be None or a finite number of seconds > 0, got {stop_grace!r}")
    backend = _resolve_backend(backend, world_size, start_method)
    pg_timeout = min(60.0, timeout / 2) if pg_timeout is None else float(pg_timeout)
    payload = _pickle_payload(fn, args, kwargs)

    start = time.monotonic()
    # The parent owns the rendezvous, so the port is picked by the OS and nothing is hard-coded.
    store = dist.TCPStore(_HOST, 0, None, True, timeout=timedelta(seconds=timeout),
                          wait_for_workers=False)
    child_env = _child_env(backend, world_size, store.port, env)
    if start_method == "forkserver":
        forkserver.start()
        # a variable the server's modules read when it imported them, set otherwise for these ranks: only a
        # fresh interpreter sees it (TRITON_INTERPRET for a test's Triton ranks)
        if forkserver.stale_variables(child_env):
            start_method = "spawn"
    ctx = _context(start_method)
    procs, conns, lifelines = [], [], []
    # A rank killed by SIGSEGV/SIGABRT sends no message; faulthandler writes its Python stack here instead.
    _remove_abandoned_crash_dirs()
    crash_dir = tempfile.mkdtemp(prefix=f"{_CRASH_PREFIX}{os.getpid()}-")
    crash_paths = [os.path.join(crash_dir, f"rank{rank}.stack") for rank in range(world_size)]
    try:
        with _ForwardSignals(procs) as signals:
            for rank in range(world_size):
                reader, writer = ctx.Pipe(duplex=False)
                # a forked child would inherit its siblings' lifelines and never see one close
                life_r, life_w = ctx.Pipe(duplex=False) if start_method != "fork" else (None, None)
                proc = ctx.Process(target=_worker, name=f"longctx-rank{rank}", daemon=False,
                                   args=(rank, world_size, backend, store.port, pg_timeout, num_threads,
                                         child_env, payload, writer, life_r, crash_paths[rank], record_stops))
                conns.append(reader)
                lifelines.append(life_w)
                try:
                    proc.start()
                    procs.append(proc)
                finally:
                    # Only the child may hold the write end, or its death would not close the pipe;
                    # only this process may hold a lifeline's write end, or its death would not show.
                    writer.close()
                    if life_r is not None:
                        life_r.close()
                if signals.received:  # stopped before every rank started: none can have met its peers, or trained
                    print(f"longctx: {signal.Signals(signals.received).name} received while the ranks were "
                          "starting: stopped before any step", file=sys.stderr, flush=True)
                    raise SystemExit(128 + signals.received)  # finally: the started ranks are ended
            try:
                results = _collect(procs, conns, start + timeout, timeout, crash_paths, stop_grace)
            except RankError as e:
                if not signals.received or e.exitcode != -signals.received:
                    raise
                # the stop signal passed on ended ranks that do not handle it (checkpoint.on_signal=false): the
                # launcher ends as they did, not with a report of a dead rank that reads as a bug
                print(f"longctx: stopped by {signal.Signals(signals.received).name}, passed on to the ranks, which "
                      "ended on it without a checkpoint", file=sys.stderr, flush=True)
                raise SystemExit(128 + signals.received) from None
            _join(procs, _EXIT_GRACE_S)
        return results
    finally:
        _reap(procs)
        for conn in [*conns, *lifelines]:
            if conn is not None:
                conn.close()
        shutil.rmtree(crash_dir, ignore_errors=True)
        del store


_CRASH_PREFIX = "longctx-ranks-"


def _remove_abandoned_crash_dirs() -> None:
    """The crash-stack directories of launchers that are gone (killed outright: their `finally` never ran),
    named by the launcher's pid; a live one's are left alone."""
    root = tempfile.gettempdir()
    try:
        names = os.listdir(root)
    except OSError:
        return
    for name in names:
        pid = name[len(_CRASH_PREFIX):].split("-", 1)[0] if name.startswith(_CRASH_PREFIX) else ""
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except OSError:  # alive, another user's
            pass


def _check_args(fn, world_size, backend, timeout, pg_timeout, start_method, num_threads, env):
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    if not _is_seconds(timeout):
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if pg_timeout is not None and not _is_seconds(pg_timeout):
        raise ValueError(f"pg_timeout must be None or a finite number of seconds > 0, got {pg_timeout!r}")
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if start_method not in _START_METHODS:
        raise ValueError(f"start_method must be one of {_START_METHODS}, got {start_method!r}")
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads must be an int >= 1, got {num_threads!r}")
    if env is not None and not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise TypeError("env must map str to str")


def _is_seconds(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < float("inf")


def _resolve_backend(backend, world_size, start_method):
    # Probing CUDA in the parent initialises the driver, which a forked child cannot use; with
    # fork, "auto" therefore stays on gloo without asking.
    if backend == "auto":
        if start_method != "fork" and dist.is_nccl_available() and torch.cuda.device_count() >= world_size:
            return "nccl"
        return "gloo"
    if backend == "nccl":
        if start_method == "fork":
            raise ValueError("backend='nccl' cannot use start_method='fork' (CUDA does not survive "
                             "fork); use 'forkserver' or 'spawn'")
        if not dist.is_nccl_available():
            raise RuntimeError("backend='nccl' requested but this torch build has no NCCL; use "
                               "backend='gloo' or 'auto'")
        count = torch.cuda.device_count()
        if count < world_size:
            raise RuntimeError(f"backend='nccl' needs one CUDA device per rank: world_size={world_size} "
                               f"but torch.cuda.device_count()={count}; use backend='gloo' or 'auto'")
    return backend


def _pickle_payload(fn, args, kwargs):
    # Checked here because in a child an unpicklable fn only shows up as an obscure error.
    try:
        pickle.dumps(fn)
    except Exception as exc:
        raise TypeError(
            f"fn={fn!r} cannot be pickled ({exc}); run() sends fn to other processes, so define it "
            "at module level (not a lambda, closure or nested function)"
        ) from exc
    try:
        # Plain pickle copies tensor data; multiprocessing's pickler would share it instead.
        return pickle.dumps((fn, tuple(args), kwargs))
    except Exception as exc:
        raise TypeError(f"args/kwargs for run() cannot be pickled: {exc}") from exc


def _context(start_method):
    ctx = _contexts.get(start_method)
    if ctx is None:
        ctx = _contexts[start_method] = mp.get_context(start_method)
    return ctx


def _child_env(backend, world_size, port, env):
    # A forkserver child inherits the server's environment from when it started, not the caller's
    # current one, so the whole environment is shipped to keep all start methods alike.
    child = dict(os.environ)
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in child and os.path.exists("/sys/class/net/lo"):
        # Otherwise gloo binds whatever the hostname resolves to, which may not be reachable.
        child["GLOO_SOCKET_IFNAME"] = "lo"
    child.update(WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR=_HOST,
                 MASTER_PORT=str(port))
    child.update(env or {})
    return child


class _ForwardSignals(ForwardingScope):
    """While the ranks run, SIGTERM and SIGUSR1 sent to this process (a scheduler stopping the job) are
    passed on to every rank, and the ranks are still waited for: a Trainer finishes its step, saves a
    checkpoint and returns (see longctx.train.stop). A second signal stops waiting: run()'s cleanup kills
    the ranks. Only from the main thread (signal handlers live there); elsewhere nothing is forwarded."""

    def __init__(self, procs):
        super().__init__()
        self.procs = procs

    def forward(self, signum: int) -> None:
        for proc in self.procs:
            if proc.is_alive():
                os.kill(proc.pid, signum)


def _watch_launcher(lifeline):
    """A rank's daemon thread: the launcher holds the only write end of `lifeline`, so end-of-file means it
    is gone, however it died (SIGKILL included). The rank then gets SIGTERM, as if a scheduler had sent
    it: a Trainer checkpoints and stops, anything else ends. Without this, ranks outlive their launcher
    and go on training (their collectives no longer need it)."""
    try:
        lifeline.recv_bytes()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def _worker(rank, world_size, backend, port, pg_timeout, num_threads, env, payload, conn, lifeline=None,
            crash_path=None, record_stops=False):
    # ignored and blocked by the forkserver (see forkserver.start), not by a rank
    if record_stops:
        record_from_start()
    else:
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    if crash_path is not None:
        # Kept open for the life of the process: faulthandler writes to its descriptor from a signal handler.
        faulthandler.enable(open(crash_path, "w"), all_threads=True)
    torch.set_num_threads(num_threads)
    os.environ.clear()
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    if lifeline is not None:
        threading.Thread(target=_watch_launcher, args=(lifeline,), name="longctx-lifeline", daemon=True).start()
    try:
        try:
            fn, args, kwargs = pickle.loads(payload)
            if backend == "nccl":
                torch.cuda.set_device(rank)
            store = dist.TCPStore(_HOST, port, None, False, timeout=timedelta(seconds=pg_timeout))
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                                    timeout=timedelta(seconds=pg_timeout))
            # Plain pickle: multiprocessing's pickler would hand tensors over as file descriptors
            # that close when this process exits.
            message = pickle.dumps(("ok", rank, _to_cpu(fn(*args, **kwargs))))
        except BaseException as exc:
            message = pickle.dumps(("error", rank, type(exc).__name__, str(exc), traceback.format_exc()))
        try:
            conn.send_bytes(message)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the launcher is gone (see _watch_launcher); nobody is left to tell
    finally:
        conn.close()
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        out = copy.copy(obj)  # keeps the mapping type (OrderedDict, defaultdict, ...)
        for key, value in obj.items():
            out[key] = _to_cpu(value)
        return out
    if isinstance(obj, tuple):
        items = [_to_cpu(x) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, list):
        return type(obj)(_to_cpu(x) for x in obj)
    return obj


def _collect(procs, conns, deadline, timeout, crash_paths, stop_grace=None):
    """Wait for one message per rank; stop early on failure, raise on failure or timeout (after SIGTERM and
    `stop_grace` seconds for the ranks to end, when given)."""
    world_size = len(procs)
    results = [None] * world_size
    pending = set(range(world_size))
    failures = []  # (rank, remote_type, message, traceback, exitcode) in order of arrival
    open_conns = {conn: rank for rank, conn in enumerate(conns)}
    sentinels = {proc.sentinel: rank for rank, proc in enumerate(procs)}
    stop = deadline
    stopping = False  # the ranks were sent SIGTERM at the deadline: what follows is the timeout's doing

    def read(conn):
        rank = open_conns.pop(conn)
        try:
            message = pickle.loads(conn.recv_bytes())
        except EOFError:
            return  # closed without a word; the sentinel reports how the process ended
        except Exception as exc:
            failures.append((rank, type(exc).__name__, f"result could not be unpickled in the caller: "
                             f"{exc}", traceback.format_exc(), None))
        else:
            if message[0] == "ok":
                results[rank] = message[2]
            else:
                failures.append((rank, *message[2:], None))
        pending.discard(rank)

    while pending and time.monotonic() < stop:
        # at most an hour a wait, then round again: poll() refuses a timeout past ~24.8 days (2**31 ms)
        ready = wait([*open_conns, *sentinels], timeout=min(stop - time.monotonic(), 3600.0))
        # Messages first: a rank that reported and then exited has not died early.
        for conn in [obj for obj in ready if obj in open_conns]:
            read(conn)
        for sentinel in [obj for obj in ready if obj in sentinels]:
            rank = sentinels.pop(sentinel)
            if conns[rank] in open_conns and conns[rank].poll():
                read(conns[rank])
            if rank in pending:
                pending.discard(rank)
                # a fork/spawn child's sentinel closes as it exits, a moment before waitpid can report it: wait
                # for the exit code (a forkserver child's comes through the sentinel itself)
                procs[rank].join(_KILL_GRACE_S)
                failures.append((rank, None, None, crash_stack(crash_paths[rank]), procs[rank].exitcode))
        if failures and stop == deadline:
            stop = min(deadline, time.monotonic() + _FAILURE_GRACE_S)
        if pending and not failures and stop_grace and not stopping and time.monotonic() >= deadline:
            stopping, stop = True, time.monotonic() + stop_grace
            for rank in pending:
                if procs[rank].is_alive():
                    os.kill(procs[rank].pid, signal.SIGTERM)

    if stopping:
        raise TimeoutError(f"run() timed out after {timeout} s: its ranks were sent SIGTERM and given {stop_grace:g} s "
                           f"to end{f'; rank(s) {sorted(pending)} had not and were killed' if pending else ''}")
    if failures:
        raise rank_error(failures, pending)
    if pending:
        raise TimeoutError(
            f"run() timed out after {timeout} s: rank(s) {sorted(pending)} of {world_size} had not "
            "finished and every rank was killed. Pass a larger timeout= if the work needs longer; if "
            "ranks are stuck in a collective, a smaller pg_timeout= makes them raise instead."
        )
    return results


def _join(procs, grace):
    end = time.monotonic() + grace
    for proc in procs:
        proc.join(max(0.0, end - time.monotonic()))


def _reap(procs):
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    _join(procs, _KILL_GRACE_S)
    for proc in procs:
        if proc.is_alive():
            proc.kill()
            proc.join(_KILL_GRACE_S)
        if not proc.is_alive():
            proc.close()  # frees the sentinel fd now rather than at garbage collection

"""The signals a scheduler sends before it kills a job, handled for the length of a `with` block.

SIGTERM is what preemption, `scancel`, Kubernetes and torchrun's agent send; SIGUSR1 is SLURM's warning
before the time limit (`sbatch --signal=USR1@120`). Two users: the training loop records a stop request
(train/stop.py) and the launchers pass the signal on to their ranks (launch/local.py, launch/ray_launcher.py).
Dependency-free, so the launcher (preloaded into every rank's forkserver) can import it cheaply.
"""

from __future__ import annotations

import os
import signal
import threading

# the process that started this one, noted when longctx is first imported (`python -m longctx` imports this module
# before torch): under torchrun, its agent, which launch.env.watch_agent must see die even before the rank is ready
PARENT_AT_START = os.getppid()

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


pending = {"signal": 0}  # a stop signal recorded before any training loop listened (`record_from_start`)


def record_from_start() -> None:
    """From now on SIGTERM / SIGUSR1 are recorded in `pending` instead of ending the process, for a rank that
    will train: a training loop's scope (train/stop.py) takes the signal over when it opens, so a signal during
    start-up (model build, checkpoint load) stops the run after its first step with a checkpoint (one in the
    rendezvous ends the process: launch/env.py waiting_in_torch). Main thread only."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda signum, frame: pending.update(signal=pending["signal"] or signum))


def stop_by_default() -> None:
    """Undo `record_from_start` where stop signals are not to be handled (checkpoint.on_signal=false): the
    default action again, and one already recorded acted on now."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        if pending["signal"]:
            os.kill(os.getpid(), pending["signal"])


class SignalScope:
    """`with scope:` calls `scope.handle(signum)` on each of `scope.signals` and restores the previous
    handlers afterwards. Handlers live in the main thread only; elsewhere nothing is installed."""

    signals: tuple = STOP_SIGNALS

    def __init__(self):
        self._previous: dict = {}

    def handle(self, signum: int) -> None:
        raise NotImplementedError

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, lambda signum, frame: self.handle(signum))
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class ForwardingScope(SignalScope):
    """For a launcher: the first stop signal is passed on to its ranks (`forward`) and the launcher keeps
    waiting for them to checkpoint and return; a second one stops waiting (SystemExit(128 + signal), and
    the launcher's cleanup ends the ranks). `received`: the first signal, 0 if none."""

    def __init__(self):
        super().__init__()
        self.received = 0

    def forward(self, signum: int) -> None:
        raise NotImplementedError

    def handle(self, signum: int) -> None:
        if self.received:
            raise SystemExit(128 + signum)
        self.received = signum
        self.forward(signum)

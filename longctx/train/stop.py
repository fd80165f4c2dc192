"""Stopping on a scheduler's signal without losing the work done.

SIGTERM is what preemption, `scancel`, Kubernetes and torchrun's agent (forwarding its own) send before a
kill; SIGUSR1 is SLURM's warning before the time limit (`sbatch --signal=USR1@120`). While `Trainer.fit`
runs, the handler only records the signal: the step in flight finishes, every rank learns of it in the
step's closing all-reduce (one rank receiving it is enough, so all stop after the same step), and fit
saves a checkpoint of that step and returns. `longctx train` then exits with 128 + the signal number, so a
scheduler sees a job that did not finish, and `train.resume=auto` continues it bit for bit.

A second signal changes nothing (a checkpoint half written is worth less than one finished); SIGKILL
stops at once. Handlers can only be installed from the main thread; elsewhere this is a no-op.
"""

from __future__ import annotations

import signal
import threading

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopSignals:
    """`with StopSignals(enabled) as stop:` records SIGTERM / SIGUSR1 in `stop.received` (0: none)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.received = 0
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

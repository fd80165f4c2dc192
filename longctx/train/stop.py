"""Stopping on a scheduler's signal without losing the work done.

SIGTERM and SIGUSR1 are what a scheduler sends before a kill (longctx/_signals.py). While `Trainer.fit`
runs, the handler only records them: the step in flight finishes, every rank learns of it in the
step's closing all-reduce (one rank receiving it is enough, so all stop after the same step), and fit
saves a checkpoint of that step and returns. `longctx train` then exits with 128 + the signal number, so a
scheduler sees a job that did not finish, and `train.resume=auto` continues it bit for bit.

A second signal changes nothing (a checkpoint half written is worth less than one finished); SIGKILL
stops at once. Handlers can only be installed from the main thread; elsewhere this is a no-op
(longctx/_signals.py).
"""

from __future__ import annotations

import signal

from .._signals import STOP_SIGNALS, SignalScope


class StopSignals(SignalScope):
    """`with StopSignals(enabled) as stop:` records SIGTERM / SIGUSR1 in `stop.received` (0: none)."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.signals = STOP_SIGNALS if enabled else ()
        self.received = 0

    def handle(self, signum: int) -> None:
        self.received = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

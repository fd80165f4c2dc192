"""Stopping on a scheduler's signal without losing the work done.

SIGTERM and SIGUSR1 are what a scheduler sends before a kill (longctx/_signals.py). While `Trainer.fit`
runs, the handler only records them: the step in flight finishes, every rank learns of it in the
step's closing all-reduce (one rank receiving it is enough, so all stop after the same step), and fit
saves a checkpoint of that step and returns. `longctx train` then exits with 128 + the signal number, so a
scheduler sees a job that did not finish, and `train.resume=auto` continues it bit for bit.

A second signal changes nothing (a checkpoint half written is worth less than one finished); SIGKILL
stops at once. Handlers can only be installed from the main thread (longctx/_signals.py). Where the loop
runs on another thread (a Ray Train worker runs it on one of its own), its launcher calls
`request_stop(signum)` instead, which the loop treats as that signal arriving.
"""

from __future__ import annotations

import signal

from .._signals import STOP_SIGNALS, SignalScope

_open: list = []  # the StopSignals scopes open in this process (a training loop inside each)


class StopSignals(SignalScope):
    """`with StopSignals(enabled) as stop:` records SIGTERM / SIGUSR1 in `stop.received` (0: none)."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.signals = STOP_SIGNALS if enabled else ()
        self.received = 0

    def handle(self, signum: int) -> None:
        self.received = signum

    def __enter__(self):
        _open.append(self)
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        _open.remove(self)
        super().__exit__(*exc)


def request_stop(signum: int = signal.SIGTERM) -> bool:
    """As if `signum` had reached every training loop running in this process, from any thread (for
    launchers whose ranks cannot take the signal themselves). False when no loop listens (none running,
    or checkpoint.on_signal=false); a caller that must not miss the loop's start asks again."""
    listening = [scope for scope in list(_open) if scope.signals]
    for scope in listening:
        scope.handle(signum)
    return bool(listening)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name

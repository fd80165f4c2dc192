"""Stopping on a scheduler's signal, or on a diverged step, without losing the work done.

SIGTERM and SIGUSR1 are what a scheduler sends before a kill (longctx/_signals.py). While `Trainer.fit`
runs, the handler only records them: the step in flight finishes, every rank learns of it in the
step's closing all-reduce (one rank receiving it is enough, so all stop after the same step), and fit
saves a checkpoint of that step and returns. `longctx train` then exits with 128 + the signal number, so a
scheduler sees a job that did not finish, and `train.resume=auto` continues it bit for bit.

A second signal changes nothing (a checkpoint half written is worth less than one finished); SIGKILL
stops at once. Handlers can only be installed from the main thread (longctx/_signals.py). Where the loop
runs on another thread (a Ray Train worker runs it on one of its own), its launcher calls
`request_stop(signum)` instead, which the loop treats as that signal arriving.

A step whose global gradient norm is not finite (NaN or inf: the loss overflowed, the learning rate is too
high, the data holds something the model cannot take) has its update withheld, so the weights, the Adam
states and every later checkpoint stay finite. The norm is reduced over every rank, so all of them see
the same value and decide alike. DeepSpeed withholds such a step itself (its overflow check, at every
ZeRO stage; it reports the norm as inf). `NonFinite` counts such steps in a row: up to train.skip_nonfinite are
skipped with a warning (their batch is consumed, the LR schedule moves on); one more raises `Diverged`
naming the step and the checkpoint to go back to.
"""

from __future__ import annotations

import math
import signal

from .._signals import STOP_SIGNALS, SignalScope, pending
from ..config import ConfigError

_open: list = []  # the StopSignals scopes open in this process (a training loop inside each)


class StopSignals(SignalScope):
    """`with StopSignals(enabled) as stop:` records SIGTERM / SIGUSR1 in `stop.received` (0: none)."""

    def __init__(self, enabled: bool = True):
        super().__init__()
        self.signals = STOP_SIGNALS if enabled else ()
        self.received = 0

    def handle(self, signum: int) -> None:
        self.received = self.received or signum  # the first one names the stop (a later SIGTERM, e.g. the
        # lifeline's when the launcher goes, does not rename a SIGUSR1)

    def __enter__(self):
        if self.signals:  # a signal recorded while the job started (by an enclosing scope, or before any) is ours
            for outer in _open:
                self.received, outer.received = self.received or outer.received, 0
            self.received, pending["signal"] = self.received or pending["signal"], 0
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


class Diverged(ConfigError):
    """More non-finite steps in a row than train.skip_nonfinite allows (the settings' fault, not a bug:
    printed as one line)."""


class NonFinite:
    """Counts the steps in a row whose global gradient norm was not finite."""

    def __init__(self, allowed: int):
        self.allowed, self.in_a_row = allowed, 0

    def check(self, record: dict, last_checkpoint: str | None) -> str | None:
        """None for a finite step; a warning line for a skipped one within train.skip_nonfinite; else raises
        Diverged."""
        if math.isfinite(record["grad_norm"]):
            self.in_a_row = 0
            return None
        self.in_a_row += 1
        what = (f"step {record['step']}: the gradient norm is {record['grad_norm']} (loss {record['loss']:.6g})")
        back = f"resume from {last_checkpoint}" if last_checkpoint else "start again"
        if self.in_a_row > self.allowed:
            row = f" ({self.in_a_row} in a row)" if self.in_a_row > 1 else ""
            raise Diverged(f"{what}{row}: its update was not applied, and no checkpoint holds it; {back} with a "
                           f"lower train.lr or train.grad_clip, or allow train.skip_nonfinite={self.in_a_row} "
                           f"such steps in a row to be skipped")
        return (f"longctx: warning: {what}: update skipped ({self.in_a_row} of train.skip_nonfinite="
                f"{self.allowed} in a row)")

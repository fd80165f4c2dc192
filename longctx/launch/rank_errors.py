"""How the simulated cluster (and the Ray launcher) reports failed ranks: one error that names the rank that
actually broke, with its remote traceback, rather than the connection errors it set off in its peers."""

from __future__ import annotations

import signal

__all__ = ["RankError", "crash_stack", "rank_error"]

# Failures that are usually a symptom of another rank going away or never arriving. The exception
# lives in another process, so it can only be recognised by type name and message.
_SECONDARY_TYPES = {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}
_SECONDARY_MARKERS = ("connection closed by peer", "connection reset by peer", "broken pipe",
                      "timed out", "socket timeout", "communicator was aborted")


class RankError(RuntimeError):
    """A rank raised (``remote_type``/``remote_message``/``remote_traceback`` set) or died (``exitcode``)."""

    def __init__(self, message, rank, remote_type=None, remote_traceback=None, exitcode=None, remote_message=None):
        super().__init__(message)
        self.rank = rank
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback
        self.exitcode = exitcode

    def __reduce__(self):
        # The default reduce would call __init__ with the message only.
        args = (self.args[0], self.rank, self.remote_type, self.remote_traceback, self.exitcode, self.remote_message)
        return type(self), args


def crash_stack(path):
    """What faulthandler wrote for a rank that died on a fatal signal, or None."""
    try:
        with open(path) as stack:
            text = stack.read().strip()
    except OSError:
        return None
    return f"faulthandler's stack of the dead rank:\n{text}" if text else None


def _is_secondary(failure):
    _, remote_type, message, _, exitcode = failure
    if exitcode is not None:
        return False
    return remote_type in _SECONDARY_TYPES or any(m in (message or "").lower() for m in _SECONDARY_MARKERS)


def _describe(failure):
    rank, remote_type, message, _, exitcode = failure
    if exitcode is None and remote_type is None:  # its process gone, its exit code not (yet) known
        return f"rank {rank} ended before returning, exit code unknown"
    if exitcode is None:
        return f"rank {rank} failed with {remote_type}: {message}"
    how = f"exit code {exitcode}"
    if exitcode < 0:
        try:
            how += f" ({signal.Signals(-exitcode).name})"
        except ValueError:
            pass
    return f"rank {rank} died with {how} before returning"


def rank_error(failures, pending):
    """The RankError of `failures` [(rank, remote type, message, traceback, exit code)]: the lowest rank whose
    failure is not an echo of another's (the Ray launcher reports its workers' failures through it too)."""
    primary = [f for f in failures if not _is_secondary(f)]
    chosen = min(primary, key=lambda f: f[0]) if primary else failures[0]
    rank, remote_type, remote_message, remote_tb, exitcode = chosen
    text = _describe(chosen)
    others = [f for f in failures if f is not chosen]
    if others:
        text += "\nother failures: " + "; ".join(_describe(f).splitlines()[0][:200] for f in others)
    if pending:
        text += f"\nstill running when this was reported (then killed): rank(s) {sorted(pending)}"
        if not primary:
            text += (" -- a rank that never reaches a collective makes its peers' collectives fail "
                     "after pg_timeout")
    if remote_tb:
        text += f"\n\n--- traceback from rank {rank} ---\n{remote_tb.rstrip()}"
    return RankError(text, rank, remote_type, remote_tb, exitcode, remote_message)

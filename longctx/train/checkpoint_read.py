"""Reading a checkpoint's files: torch.load and DCP wrapped so that a file that cannot be read (damaged after
it was written, in a checkpoint from before the digests of checkpoint_dirs) or weights that do not fit the
model are one line naming the checkpoint and the fix, not a traceback per rank."""

from __future__ import annotations

import os
import pickle

import torch

from ..config import ConfigError


class Mismatch(ConfigError):
    """A checkpoint read that failed because its weights do not fit the model (`detail`: the line saying which)."""

    def __init__(self, message: str, detail: str):
        super().__init__(message)
        self.detail = detail


# what torch.load and DCP raise for bytes that are not what was written (CheckpointException is a
# BaseException: DCP gathers every rank's error into one); unpickling random bytes raises any of these
# (a frame length past 2**63 is an OverflowError, a huge one a MemoryError)
_UNREADABLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, KeyError, OSError, OverflowError,
               MemoryError, IndexError, TypeError, AttributeError, ImportError)


def load_file(path: str, name: str, **kwargs):
    """torch.load(weights_only=True) of one file of checkpoint `path`; a damaged file is a ConfigError."""
    try:
        return torch.load(os.path.join(path, name), weights_only=True, **kwargs)
    except _UNREADABLE as e:
        raise read_error(path, e, name) from None


def read_dcp(state: dict, path: str, *, no_dist: bool = False) -> None:
    """dcp.load of `state` (keyed by saved names) from checkpoint `path`, errors as read_error's one line.
    The .metadata is read first, so a damaged one fails here rather than after DCP logs a traceback per
    rank. no_dist: this process reads everything itself (no process group), as intended."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    saved_entries(path)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, checkpoint_id=path, no_dist=no_dist)
        except (CheckpointException, *_UNREADABLE) as e:  # CheckpointException: a BaseException
            raise read_error(path, e) from None


def saved_entries(path: str) -> dict:
    """{saved key: DCP metadata} of a DCP checkpoint; an unreadable .metadata is a ConfigError."""
    import torch.distributed.checkpoint as dcp

    try:
        return dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    except _UNREADABLE as e:
        raise read_error(path, e, ".metadata") from None


_FITS = ("size mismatch", "shape", "missing key", "unexpected key")  # words of a load that does not fit


_SOURCE = ("raise ", "File \"", "return ", "^", "~")


def telling_line(error: BaseException) -> str:
    """The line of a failed load's message that says what went wrong: DCP gathers every rank's traceback
    and load_state_dict lists every key, but the line naming a key and its shapes says it."""
    # DCP's gathered tracebacks quote the source lines that raised (`raise RuntimeError(f"Missing key ...`): not those
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip() and not ln.strip().startswith(_SOURCE)]
    return next((ln for ln in lines if any(w in ln.lower() for w in _FITS)), None) or \
        next((ln for ln in lines if "Error:" in ln), lines[0] if lines else type(error).__name__)


def read_error(path: str, error: BaseException, name: str | None = None) -> ConfigError:
    """One line for a checkpoint read that failed: its weights do not fit the model it is read into (a
    shape or name the model does not have), or a file is damaged."""
    first = telling_line(error).split(". ")[0]  # torch's explanations run on for lines
    config = os.path.join(path, "config.yaml")
    if isinstance(error, KeyError) or any(w in first.lower() for w in _FITS):
        return Mismatch(f"checkpoint {path} does not fit this model: {first[:300]} (a different model shape or "
                        f"pipeline layout?); use the config it was written with ({config})", first[:300])
    what = f"its file {name}" if name else "its files"
    return ConfigError(f"checkpoint {path}: {what} cannot be read ({first[:200]}): the checkpoint is damaged (changed "
                       "after it was written); pass an older checkpoint")

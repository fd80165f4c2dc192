"""Where checkpoints live and which are complete: `step_00000012/` directories under a checkpoint root,
each sealed by a `COMPLETE` marker listing every file with its size and SHA-256. A directory without the
marker, or whose files' sizes differ from it, was interrupted or damaged and is skipped (with the reason),
never loaded. Sizes are checked whenever checkpoints are listed (cheap); contents only for the checkpoint
about to be read (`damaged_file`, every file read once, shared out over the ranks), so bytes changed after
the write (same size, other bytes: a bit flip in a tensor loads without complaint) are found before any of
them reach the model. What goes inside a checkpoint is train/checkpoint.py's; reading its files is
train/checkpoint_read.py's."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys

import torch.distributed as dist

from .._paths import replace_dir
from ..config import ConfigError

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"step_{step:08d}")


def _marker(path: str) -> dict:
    """The completion marker, checked for the shape seal() writes (ValueError says what is off): valid JSON
    of another shape is a damaged marker like any other, and one listing no file vouches for nothing."""
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict) or not files or not all(
            isinstance(n, str) and isinstance(size, int) and not isinstance(size, bool) and size >= 0
            for n, size in files.items()):
        raise ValueError("no list of files with their sizes")
    digests = marker.get("sha256", {})
    if not isinstance(digests, dict) or not all(isinstance(d, str) for d in digests.values()) or \
            not set(digests) <= set(files):
        raise ValueError("its digests do not match its files")
    return marker


def problem(path: str) -> str | None:
    """None if `path` is a complete checkpoint (by its files' sizes), else what is wrong with it."""
    if not os.path.isfile(os.path.join(path, MARKER)):
        return "no completion marker (the write was interrupted)"
    try:
        files = _marker(path)["files"]
    except json.JSONDecodeError as e:
        return f"unreadable completion marker ({type(e).__name__})"
    except (OSError, ValueError) as e:
        return f"damaged completion marker ({e})"
    for name, size in files.items():
        full = os.path.join(path, name)
        if not os.path.isfile(full):
            return f"missing file {name}"
        if os.path.getsize(full) != size:
            return f"file {name} has {os.path.getsize(full)} bytes, {size} were written"
    return None


def complete_checkpoints(root: str, log=print, skip=()) -> list[tuple[int, str]]:
    """(step, path) of every complete checkpoint under `root`, oldest first; incomplete ones are reported,
    and those in `skip` (found damaged) left out."""
    if not os.path.isdir(root):
        return []
    out = []
    for name in sorted(os.listdir(root)):
        m = _STEP_DIR.match(name)
        if not m:
            continue
        path = os.path.join(root, name)
        if path in skip:
            continue
        why = problem(path)
        if why:
            log(f"longctx: skipping checkpoint {path}: {why}")
        else:
            out.append((int(m.group(1)), path))
    return out


def continues(resume: str | None) -> bool:
    """Whether train.resume continues a run (auto, or a path) rather than starting a fresh one (none)."""
    return resume not in (None, "", "none")


# checkpoint roots this process writes (rank 0 of a run), each held by a lock on the directory itself
_HELD: dict[str, int] = {}
HOLD_WAIT_S = 30.0


def hold_root(root: str, wait_s: float | None = None) -> None:
    """Lock checkpoint root `root` (creating it) for this process until it exits: a second run writing the same
    root would delete the first's checkpoint in progress (a leftover .tmp to it), seal one of mixed files, and
    prune the other's by step. The lock is flock on the directory (no file in it), which the kernel drops
    when the process ends however it ends; a previous attempt of this job (torchrun or Ray restarting it)
    whose rank 0 is still exiting is given `wait_s` (HOLD_WAIT_S) to let go. ValueError if another process
    keeps it; a filesystem without locks gets a warning, not a failed save."""
    import fcntl
    import time

    os.makedirs(root, exist_ok=True)
    key = os.path.realpath(root)
    if key in _HELD:
        return
    fd = os.open(key, os.O_RDONLY | os.O_DIRECTORY)
    deadline = time.monotonic() + (HOLD_WAIT_S if wait_s is None else wait_s)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _HELD[key] = fd
            return
        except BlockingIOError:
            pass
        except OSError as e:  # e.g. Lustre mounted without -o flock
            os.close(fd)
            _HELD[key] = -1
            print(f"longctx: warning: checkpoint.dir {root} cannot be locked here ({e.strerror}): a second run "
                  "writing it at the same time would not be noticed", file=sys.stderr, flush=True)
            return
        if time.monotonic() >= deadline:
            os.close(fd)
            raise ValueError(f"checkpoint.dir {root} is being written by another run still in progress (it holds "
                             "the directory's lock): two runs in one root delete each other's checkpoints; give "
                             "this run a run_dir or checkpoint.dir of its own, or stop the other first")
        time.sleep(0.5)


def resolve_resume(resume: str, root: str, log=print, skip=()) -> str | None:
    """The checkpoint directory to load for train.resume (auto | none | a path), or None; `skip`: those
    found damaged (a root then falls back to its next newest). A checkpoint in `root` that this run would
    write over or prune alongside its own (another run's) is refused, and so is a root another run is
    writing now (hold_root; a root made later is taken at the first save)."""
    if os.path.isdir(root):
        hold_root(root)
    path = _resume_choice(resume, root, log, skip)
    if resume != "auto":  # auto takes the newest undamaged one: nothing of another run can lie past it
        _refuse_other_runs(path, root, resume, skip)
    return path


def _resume_choice(resume: str, root: str, log, skip) -> str | None:
    if not continues(resume):
        return None
    if resume == "auto":
        found = complete_checkpoints(root, log, skip)
        if not found and skip:  # every one damaged: a fresh start would train over them unasked
            raise ValueError(f"train.resume=auto: every complete checkpoint under {root} is damaged "
                             f"({', '.join(skip)}); restore one, or pass train.resume=none to start afresh")
        return found[-1][1] if found else None
    return locate(resume, f"train.resume={resume!r}", log, skip)


def _refuse_other_runs(path: str | None, root: str, resume: str, skip) -> None:
    """A run writes step_N directories into `root` from the step it starts at, and checkpoint.keep_last prunes
    `root` by step: a complete checkpoint there at or past that step, other than the one it resumes, is another
    run's (or the branch a resume from an older step leaves), and would be pruned or written over with no word."""
    start = int(_STEP_DIR.match(os.path.basename(os.path.normpath(path))).group(1)) if path else 0
    mine = os.path.realpath(path) if path else None
    others = [os.path.basename(p) for step, p in complete_checkpoints(root, log=lambda _: None, skip=skip)
              if step >= start and os.path.realpath(p) != mine]
    if not others:
        return
    names = ", ".join(others[:3]) + (" ..." if len(others) > 3 else "")
    if path is None:
        raise ValueError(f"checkpoint.dir {root} already holds checkpoints of an earlier run ({names}): continue that "
                         "run with train.resume=auto, or give this one a run_dir (or checkpoint.dir) of its own; the "
                         "two runs' checkpoints would be pruned together by checkpoint.keep_last, and "
                         "train.resume=auto would take the newest of either")
    raise ValueError(f"train.resume={resume!r} continues from step {start}, but {root} holds later checkpoints "
                     f"({names}) that this run would write over or prune by step with its own: move them out of "
                     f"{root} to keep them, or give this run another checkpoint.dir")


def resume_path(resume: str, root: str, rank: int, world: int, say=print) -> str | None:
    """The checkpoint train.resume names, on every rank (collective; see agree_checkpoint)."""
    return agree_checkpoint(lambda skip: resolve_resume(resume, root, log=say, skip=skip), resume,
                            f"train.resume={resume!r}", rank, world, say)


def decided_by_rank0(work, rank: int, world: int, errors: tuple):
    """What `work()` returns on rank 0, on every rank (collective): one of `errors` raised there is a ConfigError
    on every rank at once, so none is left waiting for a rank that failed."""
    answer = [None]
    if rank == 0:
        try:
            answer = [("ok", work())]
        except errors as e:
            answer = [("error", str(e))]
    if world > 1:
        dist.broadcast_object_list(answer, src=0)
    kind, value = answer[0]
    if kind == "error":
        raise ConfigError(value)
    return value


def agree_checkpoint(resolve, named: str, what: str, rank: int, world: int, say=print, only=None) -> str | None:
    """The checkpoint `resolve(skip)` picks on rank 0 (or the problem it finds), on every rank (collective),
    so a bad path fails everywhere at once instead of leaving the others waiting; then the ranks check its
    contents against its digests together (its files passing `only(path)`, default all), and a damaged one
    gives way to the next newest (auto, or a checkpoint root); `named` itself damaged is an error (`what`
    names the setting)."""
    damaged = []
    while True:
        path = decided_by_rank0(lambda: resolve(damaged), rank, world, (OSError, ValueError))
        why = path and damaged_file(path, rank, world, only(path) if only else None)
        if not why:
            return path
        if os.path.normpath(path) == os.path.normpath(named):
            raise ConfigError(f"{what} is damaged: {why}; pass an older checkpoint")
        if rank == 0:
            say(f"longctx: skipping checkpoint {path}: {why}")
        damaged.append(path)


def locate(path: str, what: str, log=print, skip=()) -> str:
    """The complete checkpoint `path` names: itself (a step_NNNNNNNN directory) or the newest complete one
    under it (a checkpoint root) not in `skip`. `what` names the argument in the errors."""
    if not os.path.exists(path):
        raise ValueError(f"{what or repr(path)} does not exist; give a checkpoint directory (step_NNNNNNNN) or a "
                         "checkpoint root")
    if _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        why = problem(path)
        if why:
            raise ValueError(f"{what} is not a complete checkpoint: {why}; pass an older one or its parent "
                             f"directory (the newest complete checkpoint there is taken)")
        return path
    found = complete_checkpoints(path, log, skip)
    if not found:
        if skip:
            raise ValueError(f"{what} holds no undamaged checkpoint: {', '.join(skip)} were damaged; pass a copy "
                             "made before the damage")
        inside = os.path.join(path, "checkpoints")  # a run directory: its checkpoints are one level down
        hint = f"; it is a run directory: pass {inside}" if complete_checkpoints(inside, lambda *a: None) else ""
        raise ValueError(f"{what} holds no complete checkpoint (step_NNNNNNNN directories with a {MARKER} marker)"
                         f"{hint}")
    return found[-1][1]


def files_under(tmp: str) -> dict:
    """Every file under `tmp` (relative path -> bytes): DCP writes flat, DeepSpeed into a sub-directory."""
    out = {}
    for root, _, names in os.walk(tmp):
        for n in names:
            full = os.path.join(root, n)
            out[os.path.relpath(full, tmp)] = os.path.getsize(full)
    return dict(sorted(out.items()))


def _sha256(full: str) -> str:
    try:
        with open(full, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError as e:  # a file one rank cannot read: recorded, not raised, so no rank is left waiting
        return f"unreadable ({type(e).__name__})"


_DIGEST = re.compile(r"[0-9a-f]{64}")


def check_digests(tmp: str, digests: dict) -> None:
    """OSError unless every file's digest was read: a checkpoint sealed with a file unread would be pruning
    the good ones before it (keep_last) and then be found damaged, or pass verification only as long as the
    file stays unreadable. Every rank holds the same gathered digests, so every rank raises alike."""
    unread = {name: digest for name, digest in digests.items() if not _DIGEST.fullmatch(str(digest))}
    if unread:
        name, why = next(iter(unread.items()))
        raise OSError(f"checkpoint {tmp}: {len(unread)} of its files could not be read back for their digests "
                      f"({name}: {why}); it is not marked complete, and the checkpoints before it are kept")


def shared_digests(path: str, names: list[str], rank: int = 0, world: int = 1) -> dict:
    """{name: SHA-256} of the files `names` under `path`, each read by one rank (names[rank::world]) and
    gathered onto every rank: collective when world > 1 (every rank passes the same names, in order)."""
    mine = {name: _sha256(os.path.join(path, name)) for name in names[rank::world]}
    if world == 1:
        return mine
    every = [None] * world
    dist.all_gather_object(every, mine)
    return {name: digest for part in every for name, digest in part.items()}


def damaged_file(path: str, rank: int = 0, world: int = 1, only=None) -> str | None:
    """None when the files of complete checkpoint `path` hold the bytes written (those whose name passes
    `only`, default all), else which differs: collective when world > 1 (see shared_digests). A checkpoint
    written before digests were recorded has only its sizes checked (by problem)."""
    written = _marker(path).get("sha256", {})
    names = sorted(n for n in written if only is None or only(n))
    found = shared_digests(path, names, rank, world)
    bad = [n for n in names if found[n] != written[n]]
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
    return f"file {bad[0]}{more} does not hold the bytes written (its SHA-256 differs from the {MARKER} marker's)"


def weight_files(path: str):
    """Which of a checkpoint's files hold its model weights (checked before they are read): DeepSpeed's
    model.pt, or DCP's metadata and shards (which hold the optimizer state as well)."""
    if os.path.isfile(os.path.join(path, "model.pt")):
        return lambda name: name == "model.pt"
    return lambda name: name == ".metadata" or name.endswith(".distcp")


def check_contents(path: str, rank: int = 0, world: int = 1, only=None) -> None:
    """damaged_file as a one-line ConfigError."""
    why = damaged_file(path, rank, world, only)
    if why:
        raise ConfigError(f"checkpoint {path} is damaged: {why}; pass an older checkpoint")


def survey(path: str) -> list[tuple[str, str | None, str]]:
    """(checkpoint, what is wrong or None, what was checked) for the checkpoint `path` names, or for every
    step_NNNNNNNN directory under a checkpoint root, oldest first: sizes, then contents by their digests."""
    if not os.path.isdir(path):
        raise ValueError(f"{path!r} is not a directory; give a checkpoint (step_NNNNNNNN) or a checkpoint root")
    if _STEP_DIR.match(os.path.basename(os.path.normpath(path))):
        dirs = [path]
    else:
        dirs = [os.path.join(path, n) for n in sorted(os.listdir(path)) if _STEP_DIR.match(n)]
        if not dirs:
            raise ValueError(f"{path!r} holds no step_NNNNNNNN checkpoint directories; give a checkpoint or a "
                             "checkpoint root (run_dir/checkpoints)")
    out = []
    for d in dirs:
        why = problem(d)
        if why:
            out.append((d, why, "sizes"))
            continue
        marker = _marker(d)
        total = sum(marker["files"].values())
        if "sha256" not in marker:
            out.append((d, None, f"sizes of {len(marker['files'])} files only (written before digests)"))
            continue
        out.append((d, damaged_file(d), f"SHA-256 of {len(marker['files'])} files, {total / 2**20:.1f} MiB"))
    return out


def seal(tmp: str, final: str, root: str, step: int, keep_last: int, digests: dict | None = None) -> None:
    """Mark the fully written `tmp` complete and rename it to `final` (one process, after every rank's
    files are on disk), then drop all but the newest `keep_last` complete checkpoints up to `step` (0: keep
    all). Later ones can only be damaged ones a resume skipped (any other would have refused the run): they
    are not newer than this one, and writing on reaches and replaces them.
    `digests`: {name: SHA-256} the ranks computed (shared_digests); any file they missed is read here."""
    files = files_under(tmp)  # before the marker exists: it does not list itself
    digests = {name: (digests or {}).get(name) or _sha256(os.path.join(tmp, name)) for name in files}
    check_digests(tmp, digests)
    with open(os.path.join(tmp, MARKER), "w") as f:
        json.dump({"step": step, "files": files, "sha256": digests}, f)
        f.flush()
        os.fsync(f.fileno())
    replace_dir(tmp, final)  # a damaged one of this step, skipped by the resume, stays until this one is in place
    kept = [(s, path) for s, path in complete_checkpoints(root, log=lambda _: None) if s <= step]
    for _, old in kept[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)

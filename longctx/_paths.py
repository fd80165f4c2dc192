"""Output paths checked before the work that fills them: a run that ends in a FileExistsError after an hour of
compute has lost the hour. ValueError naming the argument and the fix."""

from __future__ import annotations

import json
import os
import shutil
import tempfile


class WriteFailed(ValueError):
    """A result that could not be written at the end of the work (a full disk, permissions): the message names
    the argument; the command line prints it as one line."""


def blocking_file(path: str) -> str | None:
    """The existing non-directory among the parents of `path` (where its directory would have to be), if any."""
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            return None
        parent = up
    return parent if parent and not os.path.isdir(parent) else None


def check_output(path: str | None, what: str, kind: str = "file") -> None:
    """`path` can be written as a `kind` ("file" or "dir"): not empty, not the other kind, and no file in the
    way of its directories. `what` names the argument (e.g. "--json", "checkpoint.dir"). A link is checked where
    it leads, as the writers write through it (a dangling one's target is created like any new path)."""
    if path is None:
        return
    if not str(path).strip():
        raise ValueError(f"{what} is empty: give a path")
    named = path
    path = os.path.realpath(path)
    if kind == "file" and (os.path.isdir(path) or str(named).endswith(os.sep)):  # a directory, or named as one
        raise ValueError(f"{what} {named} is a directory; give a file path, e.g. {os.path.join(named, 'out')}"
                         f"{'.json' if 'json' in what else ''}")
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {named} is an existing file, not a directory; choose another path")
    blocked = blocking_file(path)
    if blocked:
        raise ValueError(f"{what} {named} cannot be created: {blocked} is a file, not a directory; choose another "
                         "path")
    _check_writable(path, named, what, kind)


def _check_writable(path: str, named: str, what: str, kind: str) -> None:
    """Create (and drop) a scratch file where `path` would go: permissions, read-only mounts and pseudo file
    systems (/proc) are found now; os.access cannot tell, as root passes it everywhere."""
    where = os.path.abspath(path) if kind == "dir" else os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(where):  # the nearest existing directory: the rest is created under it
        where = os.path.dirname(where)
    try:
        with tempfile.TemporaryFile(dir=where):
            pass
    except OSError as e:
        raise ValueError(f"{what} {named} cannot be written ({e.strerror} in {where}); choose another path") from None


def check_plot(path: str | None, what: str = "--plot") -> None:
    """`path` can take a matplotlib figure: a writable file path whose extension matplotlib knows (none: it adds .png)
    and can write here (.pgf needs a TeX system). Checked before the work, so a typo does not cost the run."""
    if path is None:
        return
    check_output(path, what)
    from ._optional import require

    matplotlib = require("matplotlib", f"{what} (plots)")
    from matplotlib.backend_bases import FigureCanvasBase

    ext = os.path.splitext(path)[1].lstrip(".").lower()
    known = dict(FigureCanvasBase.get_supported_filetypes())
    tex = matplotlib.rcParams["pgf.texsystem"]
    if shutil.which(tex) is None:  # pgf figures are typeset by it: without it savefig fails after the run
        known.pop("pgf", None)
        if ext == "pgf":
            raise ValueError(f"{what} {path}: .pgf plots are typeset by {tex}, which is not installed here; use "
                             ".pdf or .svg (or install a TeX system)")
    if ext and ext not in known:
        raise ValueError(f"{what} {path}: matplotlib cannot write .{ext} files; use one of "
                         f"{', '.join('.' + e for e in sorted(known))} (e.g. .png)")
    if not ext:  # the file written is PATH.png: that one must not be a directory
        check_output(figure_path(path), what)


def figure_path(path: str) -> str:
    """The file matplotlib's savefig writes for `path`: itself, or where it has no extension (a bare trailing
    dot counts as none) the path without trailing dots and with .png added."""
    return path if len(os.path.splitext(path)[1]) > 1 else path.rstrip(".") + ".png"


def check_distinct(json_path: str | None, plot_path: str | None) -> None:
    """--json and --plot must not end up as one file: the figure would overwrite the records."""
    if json_path and plot_path and os.path.realpath(json_path) == os.path.realpath(figure_path(plot_path)):
        raise ValueError(f"--json {json_path} and --plot {plot_path} name the same file ({figure_path(plot_path)}): "
                         "the plot would overwrite the records; give each a file of its own")


def save_figure(fig, path: str) -> str:
    """Write a matplotlib figure to `path` (creating its directories, as the JSON writers do; through a link, to
    where it leads, in the format the name given says); returns the file named."""
    named = figure_path(path)
    written = os.path.realpath(named)
    try:
        os.makedirs(os.path.dirname(written), exist_ok=True)
        fig.savefig(written, dpi=120, format=os.path.splitext(named)[1][1:].lower())
    except OSError as e:
        raise _failed("--plot", path, e) from e
    return named


def write_json(path: str, data, indent: int = 2, what: str = "--json") -> None:
    """Write `data` as JSON to `path`, creating its directories; through a link, the file it names is replaced
    and the link stays; atomically (a crash or a full disk never leaves half a file), except into a device or
    pipe, which is written to. A failed write is WriteFailed, naming `what`."""
    target = os.path.realpath(path)
    special = os.path.exists(target) and not os.path.isfile(target)  # /dev/stdout, a pipe: written to, not replaced
    written = target if special else f"{target}.tmp{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with open(written, "w") as f:
            json.dump(data, f, indent=indent, default=str)
        if not special:
            os.replace(written, target)
    except OSError as e:
        if not special and os.path.lexists(written):
            os.remove(written)
        raise _failed(what, path, e) from e


def _failed(what: str, path: str, error: OSError) -> WriteFailed:
    return WriteFailed(f"{what} {path}: writing failed ({error.strerror or error}); free space or fix permissions, "
                       "or give another path")


def exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux's renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        rename = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):  # not Linux / an older C library
        return False
    at_cwd, swap = -100, 2
    return rename(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), swap) == 0


def replace_dir(new: str, final: str) -> None:
    """Put the finished directory `new` at `final`. One there already is exchanged with it in one step, so no
    instant leaves `final` missing; where the filesystem cannot, in two renames, the previous one kept as
    FINAL.old-PID should the process die between them."""
    if not os.path.lexists(final):
        os.replace(new, final)
    elif exchange(new, final):
        shutil.rmtree(new)  # now the previous one
    else:
        old = final.rstrip("/") + f".old-{os.getpid()}"
        os.replace(final, old)
        os.replace(new, final)
        shutil.rmtree(old)

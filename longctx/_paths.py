"""Output paths checked before the work that fills them: a run that ends in a FileExistsError after an hour of
compute has lost the hour. ValueError naming the argument and the fix."""

from __future__ import annotations

import os


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
    way of its directories. `what` names the argument (e.g. "--json", "checkpoint.dir")."""
    if path is None:
        return
    if not str(path).strip():
        raise ValueError(f"{what} is empty: give a path")
    if kind == "file" and os.path.isdir(path):
        raise ValueError(f"{what} {path} is a directory; give a file path, e.g. {os.path.join(path, 'out')}"
                         f"{'.json' if 'json' in what else ''}")
    if kind == "dir" and os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{what} {path} is an existing file, not a directory; choose another path")
    blocked = blocking_file(path)
    if blocked:
        raise ValueError(f"{what} {path} cannot be created: {blocked} is a file, not a directory; choose another "
                         "path")

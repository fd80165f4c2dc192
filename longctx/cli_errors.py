"""What the command line prints as one line (`longctx: error: ...`, exit 2) instead of a traceback."""

from __future__ import annotations

import contextlib

# exception types printed as one line (also when a rank raised them)
USER_ERRORS = ("ConfigError", "Diverged", "MissingDependency", "UserError", "WriteFailed")


class UserError(Exception):
    """Raised by command code for a problem the user can fix; printed as one line."""


@contextlib.contextmanager
def checking():
    """Checks of user input (config, arguments, layouts, output paths) run inside this: their ValueErrors are
    the user's. The run itself is outside it, so a ValueError there is a bug and keeps its traceback."""
    try:
        yield
    except (ValueError, NotImplementedError) as e:
        raise UserError(str(e)) from e

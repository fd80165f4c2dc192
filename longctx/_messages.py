"""Shared wording for errors that quote another library's exception inside a one-line message."""

from __future__ import annotations


def first_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when the message is empty): libraries such as
    numpy, safetensors and `tokenizers` put a multi-line report in one exception, and a one-line error may quote
    only its head. `limit` cuts a runaway line (a whole malformed record) to that many characters."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line if limit is None else line[:limit]

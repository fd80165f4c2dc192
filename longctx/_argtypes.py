"""argparse types shared by the command line and the benchmarks: a bad value is argparse's one-line error
naming the flag."""

from __future__ import annotations

import argparse
import math


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    if value >= 2**63:  # torch's sizes are 64-bit: a larger one fails deep inside a rank
        raise argparse.ArgumentTypeError(f"must be below 2**63, got {value}")
    return value


def seed(text: str) -> int:
    """A torch generator seed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"must be between 0 and 2**63 - 1 (a torch generator seed), got {value}")
    return value


def split_names(text: str, flag: str) -> list[str]:
    """Comma-separated names: an empty item ("a,,b", a trailing comma) is refused, not dropped, since it
    usually means a name went missing; so is a name given twice (a table row twice, where another was meant)."""
    items = _split(text, flag)
    twice = sorted({x for x in items if items.count(x) > 1})
    if twice:
        raise ValueError(f"{flag} {text!r} names {', '.join(twice)} twice; give each once")
    return items


def _split(text: str, flag: str) -> list[str]:
    items = [x.strip() for x in text.split(",")]
    if any(not x for x in items):
        raise ValueError(f"{flag} {text!r} has an empty item; separate the values by single commas")
    return items


def int_list(text: str) -> list[int]:
    """Comma-separated integers (their ranges are the caller's to check, within 64 bits)."""
    try:
        values = [int(x) for x in _split(text, "")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if any(not -2**63 <= v < 2**63 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r} holds a number beyond 64 bits; give values below 2**63")
    return values


def text_prompt(text: str) -> tuple[str, str]:
    """generate --prompt: kept with --ids in one list, in the order given (the batch's rows)."""
    return ("text", text)


def ids_prompt(text: str) -> tuple[str, list[int]]:
    """generate --ids: comma-separated token ids, kept with --prompt in one list, in the order given."""
    return ("ids", int_list(text))


def float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in _split(text, "")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of numbers") from None


def seconds(text: str) -> float:
    """A --timeout: a finite number of seconds, at least 1 (the ranks' rendezvous store waits that long: a
    smaller one fails inside torch, as parallel.timeout_s below 1 would)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 second, got {text}")
    if value * 1e6 >= 2**63:  # torch keeps timeouts in int64 microseconds (and timedelta stops at ~8.6e13 s)
        raise argparse.ArgumentTypeError(f"{text} seconds is too large for a timeout; give seconds, e.g. 86400")
    return value

"""argparse types shared by the command line and the benchmarks: a bad value is argparse's one-line error
naming the flag."""

from __future__ import annotations

import argparse
import math


def seconds(text: str) -> float:
    """A --timeout: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value

"""Training data. Until token files arrive (the data issue), a synthetic source a model can learn."""

from .synthetic import TASKS, SyntheticSource

__all__ = ["TASKS", "SyntheticSource"]

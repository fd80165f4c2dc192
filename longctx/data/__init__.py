"""Training data: synthetic sequences, retrieval tasks (passkey, needle, recall), prepared token datasets
packed with their document boundaries, tokenizers and the `data prepare` pipeline."""

from .sources import SOURCES, build_source
from .synthetic import TASKS, SyntheticSource
from .tasks import RETRIEVAL, RetrievalTask
from .tokens import TokenSource

__all__ = ["RETRIEVAL", "SOURCES", "TASKS", "RetrievalTask", "SyntheticSource", "TokenSource", "build_source"]

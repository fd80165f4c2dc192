"""Launching ranks: ``run`` starts a function on W local processes with a process group each."""

from longctx.launch.local import RankError, rank_info, run

__all__ = ["RankError", "rank_info", "run"]

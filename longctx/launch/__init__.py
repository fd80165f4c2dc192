"""Launching ranks.

  run(fn, W)        the simulated cluster: W local processes, each with a process group (tests, benches)
  process_group()   the group `longctx train` finds (harness, Ray, torchrun, or a world of one)
  train_main(cfg)   the training entry every launcher runs
"""

from longctx.launch.entry import train_main
from longctx.launch.env import process_group, world_size_from_env
from longctx.launch.local import RankError, rank_info, run

__all__ = ["RankError", "rank_info", "run", "process_group", "train_main", "world_size_from_env"]

"""Batches per optimizer step for one data-parallel rank, made inline or by DataLoader worker processes.

The unit is the step: `StepBatches[step]` is this rank's micro-batches of that step (full sequences, not
yet context-sharded: the plan shards them on the rank). Since a source maps global sequence indices to
sequences, the position to resume from is the step alone; workers only prepare steps ahead (memmapped
token files are reopened in each worker, see tokens.py).
"""

from __future__ import annotations

import signal

import torch
from torch.utils.data import DataLoader, Dataset

from .synthetic import step_indices


class StepBatches(Dataset):
    def __init__(self, source, *, batch_size: int, dp_rank: int, dp_size: int, accumulation: int):
        self.source, self.batch_size, self.accumulation = source, batch_size, accumulation
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.first_step = self.first_sequence = 0  # where the stream stands at a step: set by a resume

    def sequences_before(self, step: int) -> int:
        """How many sequences the steps before `step` consumed (the data position a checkpoint records)."""
        return self.first_sequence + (step - self.first_step) * self.batch_size

    def __len__(self) -> int:
        return 2**62  # steps are unbounded: an epoch is the source's business

    def __getitem__(self, step: int) -> tuple[int, list[dict]]:
        micro = [self.source.batch(step_indices(step, batch_size=self.batch_size, dp_rank=self.dp_rank,
                                                dp_size=self.dp_size, accumulation=self.accumulation, micro=m,
                                                first_step=self.first_step, first_sequence=self.first_sequence))
                 for m in range(self.accumulation)]
        return step, micro


class StepLoader:
    """`get(step)`: the micro-batches of `step`. With workers, steps from the first asked onwards are made
    ahead in `workers` processes; asking out of order (a resume) restarts them at the step asked."""

    def __init__(self, batches: StepBatches, workers: int = 0, prefetch: int = 2):
        self.batches, self.workers, self.prefetch = batches, workers, prefetch
        self._it, self._next = None, None

    def get(self, step: int) -> list[dict]:
        if self.workers == 0:
            return self.batches[step][1]
        if self._it is None or self._next != step:
            self.close()
            loader = DataLoader(self.batches, batch_size=None, sampler=range(step, step + 2**40),
                                num_workers=self.workers, prefetch_factor=self.prefetch,
                                worker_init_fn=_one_thread, multiprocessing_context=_worker_context())
            self._it = iter(loader)
        got, micro = next(self._it)
        if got != step:
            raise RuntimeError(f"data loader returned step {got} for step {step} (a bug)")
        self._next = step + 1
        return micro

    def close(self) -> None:
        """End the worker processes (the trainer calls this when fit returns; `get` starts them again)."""
        if self._it is not None:
            self._it._shutdown_workers()  # what the iterator's __del__ does, now rather than when collected
        self._it = None


def _worker_context():
    """Workers forked from the rank itself. A rank started by forkserver (launch.run) would otherwise fork
    them from a forkserver of its own: each worker then holds that server's liveness pipe open, so neither
    notices the rank ending (torch's watchdog checks the worker's parent, the still-living server), and
    all of them outlive the job (found holding a piped stdout open ten minutes after it ended)."""
    import multiprocessing

    return multiprocessing.get_context("fork") if "fork" in multiprocessing.get_all_start_methods() else None


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # workers make batches; the rank's threads do the math
    # A scheduler signals every process of the job. A worker dying of it would make torch's SIGCHLD
    # handler raise in the rank mid-step, before the checkpoint a stop signal asks for (train/stop.py);
    # the rank ends its workers itself, and a worker whose rank is gone exits on its own.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)

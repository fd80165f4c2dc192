"""What the launcher tests share: the tiny config, free loopback ports, a run's losses and final weights, and
the fault they inject (one process SIGKILLed once a given checkpoint is written)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def same_final_weights(run_a, run_b, tmp_path) -> bool:
    """Whether the newest checkpoints of two runs hold bit-identical weights (exported, names compared too)."""
    from longctx.train import weights

    a = weights.export(os.path.join(run_a, "checkpoints"), str(tmp_path / "a.pt"))
    b = weights.export(os.path.join(run_b, "checkpoints"), str(tmp_path / "b.pt"))
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def kill_after_checkpoint(run_dir, step: int, is_target, *, delay: float = 0.0, timeout: float = 240.0):
    """In a thread: wait until the checkpoint of `step` is in place under run_dir, sleep `delay`, then SIGKILL
    the first process `is_target(psutil.Process)` accepts. Returns (thread, done); done["pid"] says whom."""
    import psutil

    done = {}

    def watch():
        target = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
        t0 = time.time()
        while time.time() - t0 < timeout and not os.path.isdir(target):
            time.sleep(0.1)
        time.sleep(delay)
        for p in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if is_target(p):
                    p.kill()
                    done["pid"] = p.pid
                    return

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, done

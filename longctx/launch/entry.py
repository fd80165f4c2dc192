"""The one training entry every launcher runs: config in, summary out."""

from __future__ import annotations

from ..config import from_dict
from .env import process_group


def train_main(config: dict, config_path: str | None = None, steps: int | None = None) -> dict:
    """Run a resolved job config (a plain dict, so it pickles to harness ranks) in the process group this
    process finds; returns the training summary. `steps`: stop after that many steps (None: to train.steps)."""
    from .._signals import stop_by_default
    from ..train import Trainer
    from ..train.stop import StopSignals

    cfg = from_dict(config)
    if not cfg.checkpoint.on_signal:  # a rank that recorded stop signals from its start (run(record_stops=True))
        stop_by_default()
    # a stop signal while the job starts (model build, checkpoint load) is kept for the loop, which stops after its
    # first step with a checkpoint, rather than ending the rank with nothing saved; one after the loop is moot
    with StopSignals(cfg.checkpoint.on_signal), process_group(cfg.parallel.timeout_s):
        check_same_config(config)
        return Trainer(cfg, config_path=config_path).fit(steps)


def check_same_config(config: dict) -> None:
    """Every rank runs one config. Under torchrun each node reads its own file and command line: a node given
    another train.lr trained silently to other losses, another seq_len aborted inside gloo. One gather of a
    digest (every launcher: cheap); where they differ, the configs, to name the keys."""
    import hashlib
    import json

    import torch.distributed as dist

    from ..config import ConfigError

    if dist.get_world_size() == 1:
        return
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    digests = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    if len(set(digests)) == 1:
        return
    configs = [None] * dist.get_world_size()
    dist.all_gather_object(configs, config)
    other = next(rank for rank, d in enumerate(digests) if d != digests[0])
    keys = _differing(configs[0], configs[other])
    said = ", ".join(f"{k}={a!r} on rank 0 but {b!r} on rank {other}" for k, a, b in keys[:3])
    raise ConfigError(f"the ranks were started with different configs ({said}{', ...' if len(keys) > 3 else ''}); "
                      "give every node the same config file and the same key=value overrides")


def _differing(a, b, prefix: str = "") -> list[tuple]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [found for key in sorted(set(a) | set(b), key=str)
                for found in _differing(a.get(key), b.get(key), f"{prefix}{key}.")]
    return [] if a == b else [(prefix.rstrip("."), a, b)]


def _eval_model(params: dict, log):
    """(model, config, cp group) of `params["checkpoint"]` on every rank: whole, or with params["tp"] > 1 its
    pieces over a (cp, tp) mesh, the group then being the mesh's cp ranks (None: the whole world)."""
    import torch.distributed as dist

    from ..eval import load_checkpoint_model
    from ..eval.weights import eval_device
    from ..parallel.dims import ParallelDims, device_type_from_env
    from ..train.checkpoint_dirs import decided_by_rank0, locate

    world, tp = dist.get_world_size(), int(params.get("tp") or 1)
    mesh, group = None, None
    if tp > 1:  # ParallelDims refuses a tp that does not divide the world (the command checked it already)
        mesh = ParallelDims(cp=world // tp, tp=tp, world_size=world, strategy=params["strategy"]).build_mesh()
        group = mesh.cp.get_group()
    # rank 0's pick of a checkpoint root's newest, on every rank: under torchrun each rank's command located it
    # itself, and a run still training into the root may have sealed another in between
    found = decided_by_rank0(lambda: locate(params["checkpoint"], f"--checkpoint {params['checkpoint']!r}", log=log),
                             dist.get_rank(), world, (OSError, ValueError))
    model, cfg = load_checkpoint_model(found, log=log, mesh=mesh, device=eval_device(device_type_from_env()))
    return model, cfg, group


# evaluation's collective timeout: a rank may take minutes to read a large checkpoint before its first collective
EVAL_TIMEOUT_S = 600.0


def eval_main(kind: str, params: dict, timeout_s: float = EVAL_TIMEOUT_S):
    """`longctx eval needle|ppl` and `longctx generate` in the process group this process finds (harness,
    torchrun, one process): every rank loads the checkpoint (whole, or with --tp its pieces over a (cp, tp)
    mesh) and takes part; rank 0's log lines are printed."""
    import torch.distributed as dist

    from ..eval import needle_grid, perplexity_by_position

    with process_group(timeout_s):
        rank0 = dist.get_rank() == 0
        log = print if rank0 else (lambda *a, **k: None)
        model, cfg, group = _eval_model(params, log)
        if kind == "needle":
            return needle_grid(model, cfg, params["lengths"], params["depths"], samples=params["samples"],
                               strategy=params["strategy"], decode=params["decode"], log=log, group=group)
        if kind == "generate":
            import torch

            out = model.generate([torch.tensor(p, dtype=torch.long) for p in params["prompts"]],
                                 max_new_tokens=params["max_new_tokens"], group=group, strategy=params["strategy"],
                                 decode=params["decode"], temperature=params["temperature"], top_k=params["top_k"],
                                 eos_id=params["eos_id"], seed=params["seed"])
            return [t.tolist() for t in out.tokens]
        return perplexity_by_position(model, params["data"] or cfg.data.path, seq_len=params["seq_len"] or
                                      cfg.train.seq_len, sequences=params["sequences"], buckets=params["buckets"],
                                      strategy=params["strategy"], first=params.get("first", 0), group=group)

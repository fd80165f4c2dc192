"""The `longctx` command: train, launch, config, checkpoint, data, eval, generate, bench, info, demo.

A user error (bad config, bad argument, impossible layout) is one line on stderr, `longctx: error: ...`,
exit status 2; a failure inside a rank shows that rank's traceback, exit status 1. LONGCTX_DEBUG=1 shows
the Python traceback of user errors too.
"""

from __future__ import annotations

import argparse
import faulthandler
import importlib
import os
import platform
import signal
import sys

from . import __version__
from ._argtypes import float_list, ids_prompt, int_list, positive_int, seconds, seed, text_prompt
from .cli_data import cmd_checkpoint_export, cmd_checkpoint_verify, cmd_data_prepare, cmd_eval, cmd_generate
from .cli_errors import USER_ERRORS, UserError
from .cli_errors import checking as _checking

# bench name -> module with add_arguments(parser) and run(args) -> list[dict] (and optionally validate(args))
BENCHES = {
    "attention": ("longctx.bench.attention", "sequence-parallel attention strategies on a simulated cluster"),
    "kernel": ("longctx.bench.kernel", "local kernel backends: TFLOP/s for fwd, bwd, fwd+bwd"),
    "decode": ("longctx.bench.decode", "tree vs ring decoding over a sharded KV cache"),
    "dilated": ("longctx.bench.dilated", "LongNet dilated attention, local and distributed"),
    "packing": ("longctx.bench.packing", "counted work imbalance of packed documents per layout, and balancing"),
    "train": ("longctx.bench.train", "training layouts side by side: tokens/s, FLOP/s, saved activations, loss"),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not usage + message
        raise UserError(f"{message} (see `{self.prog} --help`)")


def info() -> str:
    import torch
    import torch.distributed as dist

    from . import __version__
    from ._optional import probe
    from .kernels import backend_status, backends
    from .kernels import sdpa as sdpa_mod

    lines = [f"longctx {__version__}", f"python {platform.python_version()} ({sys.executable})",
             f"torch {torch.__version__}"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i} {p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})")
    else:
        lines.append("devices: cpu only (no CUDA device)")
    lines.append(
        "distributed: "
        + ", ".join(f"{n}={'yes' if ok else 'no'}" for n, ok in
                    (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())))
    )
    lines.append("optional packages:")
    for mod, extra in (("triton", "triton"), ("flash_attn", "flash"), ("ray", "ray"), ("deepspeed", "deepspeed"),
                       ("transformers", "hf"), ("tokenizers", "hf"), ("pyarrow", "data"), ("tensorboard", "dev"),
                       ("omegaconf", "required")):
        ok, what = probe(mod)
        lines.append(f"  {mod:<13} {what if ok else 'missing (extra: ' + extra + ')'}")
    lines.append("kernel backends (auto picks the highest priority that supports a call):")
    status = backend_status()
    for name, b in sorted(backends().items(), key=lambda kv: -kv[1].priority):
        state = "available" if status[name] is None else f"unavailable: {status[name]}"
        computes = ", ".join(what for what, ok in (("v of its own width", b.value_width), ("soft-capping", b.softcap))
                             if ok) or "one head width, no soft-capping"
        lines.append(f"  {name:<10} priority {b.priority:>3}  {state}; computes {computes}")
        for note in b.notes:
            lines.append(f"             {note}")
    if sdpa_mod.fallbacks:
        lines.append(f"sdpa fallbacks to reference in this process: {dict(sdpa_mod.fallbacks)}")
    return "\n".join(lines)


def _add_config_args(p) -> None:
    p.add_argument("config", help="YAML job config (e.g. configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", default=[], metavar="key=value", help="config overrides, e.g. parallel.cp=4")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="longctx", description="Exact sequence-parallel attention and long-context training")
    p.add_argument("--version", action="version", version=f"longctx {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, devices, kernel backends and why any is unavailable")
    demo = sub.add_parser("demo", help="a real training run on a simulated 4-rank CPU cluster (`make demo`)")
    demo.add_argument("--steps", type=positive_int, default=20, help="training steps of part 3")
    stopping = ("On SIGTERM or SIGUSR1 every rank finishes its step, a checkpoint of it is written and the command "
                "exits with 128 + the signal (143 for SIGTERM); train.resume=auto continues the run "
                "(checkpoint.on_signal=false: no such handling).")
    tr = sub.add_parser("train", help="train in the process group found (torchrun, Ray, harness, or one process)",
                        epilog=stopping)
    _add_config_args(tr)
    launch = sub.add_parser("launch", help="start ranks, each running `longctx train`")
    lsub = launch.add_subparsers(dest="launcher", required=True, parser_class=_Parser)
    local = lsub.add_parser("local", help="N ranks on this machine (gloo on CPU, NCCL when N GPUs are present)",
                            epilog=stopping + " The signal is passed on to the ranks; if this launcher is killed "
                            "outright, its ranks checkpoint and exit.")
    local.add_argument("--nproc", type=positive_int, required=True, help="number of ranks")
    local.add_argument("--timeout", type=seconds, default=None,
                       help="wall-clock limit in seconds for the whole run (default: none)")
    _add_config_args(local)
    ray = lsub.add_parser("ray", help="N Ray Train workers on a Ray cluster (each runs `longctx train`)",
                          epilog=stopping + " A signal to this driver (`ray job stop`) is passed on to the workers; "
                          "submit with a runtime env setting RAY_JOB_STOP_WAIT_TIME_S above Ray's default 3 s so "
                          "the checkpoint can finish.")
    ray.add_argument("--address", default="auto",
                     help="Ray cluster: auto (the running one), ray://HOST:10001, or local (start one in-process)")
    ray.add_argument("--num-workers", type=positive_int, required=True, help="number of ranks")
    ray.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per worker (0: CPU workers, gloo)")
    ray.add_argument("--max-failures", type=int, default=0,
                     help="Ray FailureConfig: restarts of a failed worker group (resume with train.resume=auto)")
    ray.add_argument("--storage-path", default=None, help="Ray Train's storage (default: run_dir/ray)")
    _add_config_args(ray)
    config = sub.add_parser("config", help="inspect configs")
    csub = config.add_subparsers(dest="config_command", required=True, parser_class=_Parser)
    show = csub.add_parser("show", help="print the resolved config (defaults + file + overrides)")
    show.add_argument("--world-size", type=positive_int, default=None,
                      help="also validate the job for this many ranks")
    _add_config_args(show)
    ckpt = sub.add_parser("checkpoint", help="check and convert checkpoints written by `longctx train` "
                                             "(checkpoint.interval)")
    cksub = ckpt.add_subparsers(dest="checkpoint_command", required=True, parser_class=_Parser)
    export = cksub.add_parser("export", help="a checkpoint's model weights as one plain state-dict file that "
                                             "torch.load(weights_only=True) reads and the unparallelised model loads")
    export.add_argument("dir", help="a checkpoint (step_NNNNNNNN) or a checkpoint root (its newest complete one)")
    export.add_argument("out", help="output file, e.g. model.pt")
    export.add_argument("--format", choices=["torch", "hf"], default="torch",
                        help="torch: one state-dict file; hf: a directory transformers loads (default: torch)")
    verify = cksub.add_parser("verify", help="check checkpoints' files against the sizes and SHA-256 digests "
                                             "recorded when they were written (exit 1 if any is damaged)")
    verify.add_argument("dir", help="a checkpoint (step_NNNNNNNN) or a checkpoint root (every checkpoint in it)")
    data = sub.add_parser("data", help="token datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    prep = dsub.add_parser("prepare", help="tokenize local text / JSONL / Parquet files into a memory-mapped "
                                           "dataset (data.source=tokens data.path=DIR)")
    prep.add_argument("--input", required=True, nargs="+", action="extend",  # --input a --input b: both
                      help="files, directories or globs ('data/*.jsonl')")
    prep.add_argument("--output", required=True, help="output directory (replaced safely when re-run)")
    prep.add_argument("--tokenizer", default="byte", help="byte (default) or a local tokenizer.json / directory")
    prep.add_argument("--text-key", default="text", help="JSONL key / Parquet column holding the text")
    prep.add_argument("--workers", type=positive_int, default=max(1, min(8, os.cpu_count() or 1)),
                      help="tokenizer processes (default: CPU count, at most 8; never more than input files or CPUs)")
    prep.add_argument("--strict", action="store_true", help="reject malformed input instead of skipping it")
    prep.add_argument("--no-eos", action="store_true", help="do not end each document with the eos token")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    ev = sub.add_parser("eval", help="evaluate a checkpoint: needle-in-a-haystack, perplexity by position")
    esub = ev.add_subparsers(dest="eval_command", required=True, parser_class=_Parser)
    needle = esub.add_parser("needle", help="accuracy by context length and needle depth (heatmap PNG + JSON)")
    needle.add_argument("--lengths", type=int_list, required=True, help="context lengths, e.g. 128,256,512")
    needle.add_argument("--depths", type=float_list, default=[0.0, 0.25, 0.5, 0.75, 1.0],
                        help="needle depths (fraction of the haystack before it), default 0,0.25,0.5,0.75,1")
    needle.add_argument("--samples", type=positive_int, default=20, help="examples per cell (default 20)")
    needle.add_argument("--decode", choices=["tree", "ring"], default="tree", help="decoding over the ranks")
    needle.add_argument("--json", default=None, help="write the records here")
    needle.add_argument("--plot", default=None, help="write the heatmap here (PNG)")
    ppl = esub.add_parser("ppl", help="perplexity by position (inside documents) on a prepared dataset")
    ppl.add_argument("--data", default=None, help="prepared dataset (default: what the run held out of training: "
                                                  "validation.path, or the last validation.holdout windows of "
                                                  "data.path; else data.path itself, with a warning)")
    ppl.add_argument("--seq-len", type=positive_int, default=None, help="default: the checkpoint's train.seq_len")
    ppl.add_argument("--sequences", type=positive_int, default=None,
                     help="windows evaluated (default 8, or as many as the held-out data has)")
    ppl.add_argument("--buckets", type=positive_int, default=8, help="position buckets (default 8)")
    ppl.add_argument("--json", default=None, help="write the buckets here")
    gen = sub.add_parser("generate", help="continue prompts with a checkpoint's model (context-parallel prefill, "
                                          "tree decoding; --tp splits the model)")
    # one list for both, so the rows (and the errors' prompt numbers) follow the command line's order
    gen.add_argument("--prompt", dest="prompts", action="append", type=text_prompt, default=[],
                     help="a text prompt (repeat for a batch)")
    gen.add_argument("--ids", dest="prompts", action="append", type=ids_prompt, default=[],
                     help="a prompt as comma-separated token ids, e.g. 5,9,12 (repeat for a batch)")
    gen.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to add (default 64)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sampled")
    gen.add_argument("--top-k", type=positive_int, default=None, help="sample among the k likeliest tokens")
    gen.add_argument("--seed", type=seed, default=None,
                     help="sampling seed (the same draws on every rank; default 0); needs --temperature > 0")
    gen.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the checkpoint's, from "
                                                        "its dataset or Hugging Face directory)")
    gen.add_argument("--decode", choices=["tree", "ring"], default="tree", help="decoding over the ranks")
    gen.add_argument("--json", default=None, help="write prompts and continuations here")
    for e in (needle, ppl, gen):
        e.add_argument("--checkpoint", required=True, help="a checkpoint (step_NNNNNNNN) or a checkpoint root")
        e.add_argument("--nproc", type=positive_int, default=1, help="ranks of the simulated cluster (context-"
                                                                      "parallel; cp x tp with --tp); under torchrun "
                                                                      "the world is used")
        e.add_argument("--strategy", default="zigzag", help="sequence-parallel strategy for the prompt / sequence")
        e.add_argument("--tp", type=positive_int, default=1,
                       help="split the model over this many tensor-parallel ranks (a divisor of the ranks; the "
                            "rest are context-parallel), for a model too big for one device (default 1)")
    bench = sub.add_parser("bench", help="benchmarks: tables, JSON, plots")
    bsub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    for name, (module, helptext) in BENCHES.items():
        bp = bsub.add_parser(name, help=helptext, description=helptext)
        bp.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(bp)
    return p


def _load(args):
    from .config import load

    return load(path=args.config, overrides=args.overrides)


def _exit_status(summary: dict) -> int:
    """0, or 128 + the signal that stopped the run (the job did not finish; its last step is checkpointed
    and train.resume=auto continues it)."""
    return 128 + summary["stop_signal"] if summary.get("stop_signal") else 0


def _finish(summary: dict) -> int:
    """Print the run's summary; returns the exit status."""
    if summary["first_loss"] is None:
        print(f"done: no steps run (already at step {summary['steps']})", flush=True)
        return _exit_status(summary)
    how = f"stopped by {summary['stopped_by']} after" if summary.get("stop_signal") else "done:"
    print(f"{how} {summary['steps']} steps, loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
          + (f", validation loss {summary['val_loss']:.4f}" if summary.get("val_loss") is not None else "")
          + f", {summary['tokens_per_s']:.0f} tokens/s, {summary['seconds']:.1f} s; metrics in "
          f"{summary['run_dir']}/metrics.jsonl", flush=True)
    return _exit_status(summary)


def cmd_train(args) -> int:
    from omegaconf import OmegaConf

    from .launch import train_main, world_size_from_env
    from .launch.env import env_rank, local_world_size
    from .train import validate_job
    from .train.machine import check_machine

    with _checking():  # one-line errors before anything is built
        cfg = _load(args)
        world = world_size_from_env()
        validate_job(cfg, world)
        check_machine(cfg, world, local_ranks=local_world_size(1))
        rank = env_rank()
    summary = train_main(OmegaConf.to_container(cfg), config_path=args.config)
    if rank == 0:
        return _finish(summary)
    return _exit_status(summary)


def _check_gpus_for(nproc: int) -> None:
    """On a machine with GPUs, `launch local` gives each rank its own; with fewer GPUs than ranks it would fall
    back to the CPU over gloo, a run hundreds of times slower that looks like a working one."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() < nproc:
        count = torch.cuda.device_count()
        raise UserError(f"--nproc {nproc} on a machine with {count} CUDA device(s): each rank needs its own, and "
                        f"without one the ranks would train on the CPU; use --nproc {count}, or hide the GPUs "
                        "(CUDA_VISIBLE_DEVICES=) to simulate the ranks on the CPU on purpose")


def cmd_launch_local(args) -> int:
    from omegaconf import OmegaConf

    from .launch import forkserver, run, train_main
    from .train import validate_job
    from .train.machine import check_machine
    from .train.setup import default_run_dir

    with _checking():
        cfg = _load(args)
        validate_job(cfg, args.nproc)
        _check_gpus_for(args.nproc)
        check_machine(cfg, args.nproc, local_ranks=args.nproc)  # the ranks run on this machine
    if cfg.run_dir is None:  # one name for every rank, chosen here
        cfg.run_dir = default_run_dir(args.config)
    if cfg.model.hf_path:  # imported once, by the server the ranks are forked from, not once by each rank
        forkserver.preload("transformers")
    timeout = args.timeout or 7 * 24 * 3600.0  # none given: a week
    stop_grace = float(cfg.parallel.timeout_s)  # at the timeout: as long as a step's collective may wait
    try:
        results = run(train_main, args.nproc, args=(OmegaConf.to_container(cfg), args.config), timeout=timeout,
                      pg_timeout=cfg.parallel.timeout_s, record_stops=True, stop_grace=stop_grace)
    except TimeoutError:
        said = (f"stopped as on SIGTERM (given up to {stop_grace:g} s, parallel.timeout_s, to checkpoint the step "
                "in flight)" if cfg.checkpoint.on_signal else "stopped (checkpoint.on_signal=false: no checkpoint "
                "of the step in flight)")
        raise UserError(f"the run did not finish within --timeout {timeout:g} s and its ranks were {said}; give "
                        f"a larger --timeout (its checkpoints resume with train.resume=auto "
                        f"run_dir={cfg.run_dir})") from None
    return _finish(results[0])


def cmd_launch_ray(args) -> int:
    from omegaconf import OmegaConf

    from .launch.ray_launcher import launch_ray
    from .train import validate_job
    from .train.setup import default_run_dir

    with _checking():
        cfg = _load(args)
        validate_job(cfg, args.num_workers)
        for flag, value in (("--gpus-per-worker", args.gpus_per_worker), ("--max-failures", args.max_failures)):
            if not value >= 0 or value == float("inf"):  # NaN compares false: it would run CPU workers silently
                raise ValueError(f"{flag} must be a finite number >= 0, got {value}")
    if cfg.run_dir is None:
        cfg.run_dir = default_run_dir(args.config)
    cfg.run_dir = os.path.abspath(cfg.run_dir)  # Ray workers do not run in this directory
    summary = launch_ray(OmegaConf.to_container(cfg), args.config, address=args.address,
                         num_workers=args.num_workers, gpus_per_worker=args.gpus_per_worker,
                         max_failures=args.max_failures,
                         storage_path=os.path.abspath(args.storage_path or f"{cfg.run_dir}/ray"))
    return _finish(summary)


def cmd_config_show(args) -> int:
    from .config import to_yaml
    from .train import validate_job

    with _checking():
        cfg = _load(args)
        p = cfg.parallel
        # without --world-size: the smallest world the degrees allow (a -1 axis of size 1), so every check
        # that does not depend on the world size still runs
        world = args.world_size or max(p.dp_replicate, 1) * max(p.dp_shard, 1) * max(p.cp, 1) * max(p.tp, 1) \
            * max(p.pp, 1)
        dims = validate_job(cfg, world)
    print(f"# valid for {world} rank(s): {dims}")
    print(to_yaml(cfg), end="")
    return 0


def _command_words(parser) -> set[str]:
    """Every subcommand name of the parser tree (train, launch, local, bench, kernel, ...)."""
    words = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                words |= {name} | _command_words(sub)
    return words


def _parse(argv):
    """parse_args, but key=value overrides may also come after options (`CONFIG a=1 --flag b=2`)."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:  # name the subcommand whose --help lists what it takes
        words = [w for w in (argv if argv is not None else sys.argv[1:]) if not w.startswith("-")]
        command = " ".join(w for w in words[:3] if w in _command_words(parser))
        raise UserError(f"unrecognized arguments: {' '.join(stray)} (see `longctx {command + ' ' if command else ''}"
                        f"--help`)")
    if extra:
        args.overrides = [*(args.overrides or []), *extra]  # (bench train fills in its default later)
    return args


def _dispatch(args) -> int:
    if args.command == "info":
        print(info())
        return 0
    if args.command == "demo":
        from .demo import check_outputs
        from .demo import main as demo_main

        with _checking():
            check_outputs()
        return demo_main(["--steps", str(args.steps)])
    if args.command == "train":
        return cmd_train(args)
    if args.command == "launch":
        return cmd_launch_ray(args) if args.launcher == "ray" else cmd_launch_local(args)
    if args.command == "config":
        return cmd_config_show(args)
    if args.command == "checkpoint":
        return {"export": cmd_checkpoint_export, "verify": cmd_checkpoint_verify}[args.checkpoint_command](args)
    if args.command in ("data", "eval", "generate"):  # each checks its input itself, then runs
        return {"data": cmd_data_prepare, "eval": cmd_eval, "generate": cmd_generate}[args.command](args)
    module = importlib.import_module(args._module)
    with _checking():  # in this process: a bad argument never reaches the ranks
        module.validate(args)
    try:
        module.run(args)
    except TimeoutError:
        limit = getattr(args, "timeout", 0)
        raise UserError(f"the benchmark's ranks did not finish within --timeout {limit:g} s and were stopped; give a "
                        "larger --timeout (or a smaller benchmark)") from None
    return 0


def main(argv=None) -> int:
    from ._optional import MissingDependency
    from ._paths import WriteFailed
    from .config import ConfigError
    from .launch import RankError

    if not faulthandler.is_enabled():  # a rank torchrun starts that dies on a signal prints its Python stack
        faulthandler.enable(all_threads=True)
    try:
        code = _dispatch(_parse(argv))
        sys.stdout.flush()  # here, not at exit: a reader gone (`| head`) is caught below
        return code
    except (UserError, ConfigError, MissingDependency, WriteFailed) as e:
        return _user_error(str(e))
    except RankError as e:
        if e.remote_type in USER_ERRORS and e.remote_message and not os.environ.get("LONGCTX_DEBUG"):
            return _user_error(f"rank {e.rank}: {e.remote_message}")
        if _out_of_memory(e.remote_message or "") and not os.environ.get("LONGCTX_DEBUG"):
            return _user_error(f"rank {e.rank} ran out of memory ({e.remote_message}); {_LESS}")
        print(f"longctx: {e}", file=sys.stderr)  # the failing rank's traceback
        return 1
    except BrokenPipeError:  # `longctx ... | head`: the reader left; no traceback, and none at exit's flush either
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except KeyboardInterrupt:  # Ctrl-C: the user's own stop, not a bug (SIGTERM/SIGUSR1 checkpoint first)
        print("longctx: interrupted", file=sys.stderr)
        return 128 + signal.SIGINT
    except (MemoryError, RuntimeError, ValueError) as e:
        if not isinstance(e, MemoryError) and not _out_of_memory(str(e)):
            raise
        return _user_error(f"out of memory ({str(e).strip().splitlines()[0] if str(e).strip() else 'MemoryError'}); "
                           f"{_LESS}")


_LESS = "ask for less: a shorter sequence, a smaller batch or model, or more ranks"


def _out_of_memory(message: str) -> bool:
    """A failed allocation (torch's CPU allocator, CUDA), or sizes whose product overflows before any
    allocation (torch's storage size, numpy's array size): not a bug, the sizes asked for do not fit."""
    lowered = message.lower()
    return any(s in lowered for s in ("can't allocate memory", "out of memory", "storage size calculation overflowed",
                                      "array is too big"))


def _user_error(message: str) -> int:
    if os.environ.get("LONGCTX_DEBUG"):
        import traceback

        traceback.print_exc()
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    print(f"longctx: error: {first}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

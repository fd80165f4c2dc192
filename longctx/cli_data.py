"""`longctx data prepare`, `longctx checkpoint export|verify`, `longctx eval needle|ppl` and `longctx generate`:
the command side (parsing lives
in cli.py). Each checks its arguments, files and output paths inside `checking()` (a ValueError there is the
user's, printed as one line) before the ranks run; a ValueError from the run itself is a bug and keeps its
traceback. `data prepare` is all reading of the user's files, so it runs inside `checking()` whole."""

from __future__ import annotations

import contextlib
import os

from ._paths import check_distinct, check_output, check_plot, write_json
from .cli_errors import checking


def cmd_data_prepare(args) -> int:
    from .data.prepare import format_summary, prepare

    with checking():
        summary = prepare(args.input, args.output, tokenizer=args.tokenizer, text_key=args.text_key,
                          workers=args.workers, strict=args.strict, add_eos=not args.no_eos,
                          progress=not args.quiet)
    print(format_summary(summary, args.output))
    return 0


def cmd_checkpoint_export(args) -> int:
    from .train.weights import distinct_parameters, export

    if args.format == "hf":  # transformers' "Writing model shards" bars would come between our lines
        with contextlib.suppress(ImportError):
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
    with checking():
        state = export(args.dir, args.out, args.format)
    n = distinct_parameters(state, args.dir)
    print(f"exported {len(state)} tensors ({n:,} parameters) to {args.out}" + (" (Hugging Face)" if
                                                                             args.format == "hf" else ""))
    return 0


def cmd_checkpoint_verify(args) -> int:
    """One line per checkpoint; 1 when any is damaged or incomplete (a script can test it before pruning)."""
    from .train.checkpoint_dirs import survey

    with checking():
        found = survey(args.dir)
    for path, why, checked in found:
        state = "ok" if why is None else "NOT COMPLETE: " if checked == "sizes" else "DAMAGED: "
        print(f"{path}: {state}{why or ''} ({checked})")
    bad = sum(why is not None for _, why, _ in found)
    print(f"{len(found) - bad} of {len(found)} checkpoints hold what was written")
    return 1 if bad else 0


def _trained_dataset(checkpoint: str) -> dict | None:
    """What the checkpoint recorded of the prepared dataset it trained on (its counts and tokenizer:
    data.tokens.identity), None where it trained on synthetic data or predates the record."""
    from .train.checkpoint_read import load_file

    data = load_file(checkpoint, "trainer.pt").get("data") or {}
    return data.get("dataset")


def _check_ppl_args(args, cfg) -> tuple[str, int, int, str | None]:
    """(dataset, first window, windows to read, what the dataset is when --data did not say) of `eval ppl`."""
    from .eval.ppl import check_ppl, held_out

    if args.data is not None and not args.data.strip():
        raise ValueError("--data is empty: give a dataset made by `longctx data prepare`, or leave --data out for the "
                         "checkpoint's own held-out data")
    seq_len = args.seq_len or cfg.train.seq_len
    trained = _trained_dataset(args.checkpoint_dir)
    data, first, what = (args.data, 0, None) if args.data else held_out(cfg, seq_len, trained)
    src = check_ppl(data, seq_len=seq_len, sequences=args.sequences or 1, buckets=args.buckets, strategy=args.strategy,
                    world=_ranks(args)[0] // args.tp, vocab_size=cfg.model.vocab_size, first=first,
                    tp=1 if cfg.model.hf_path else args.tp,  # an HF model's tp is not sequence-parallel
                    what="--data" if args.data else "the checkpoint's held-out data")
    if args.data:
        _same_tokenizer(args.data, cfg.data.path, trained)
    return data, first, args.sequences or min(8, src.n_sequences - first), what


def _same_tokenizer(data: str, trained_on: str | None, trained: dict | None) -> None:
    """--data must be tokenized as the checkpoint's training data was (ids of another tokenizer mean other text:
    the perplexity would be of nothing). The checkpoint's own record says which tokenizer that was, wherever
    the training data is now; a checkpoint without one is compared with its data.path, when that is there."""
    from .data.tokens import read_meta, tokenizer_of

    theirs = read_meta(data, "--data")
    there = bool(trained_on) and os.path.exists(os.path.join(trained_on, "meta.json"))
    ours = read_meta(trained_on, "the checkpoint's data.path") if there else None
    recorded = trained.get("tokenizer") if trained else None
    expected = recorded if recorded is not None else tokenizer_of(ours) if ours is not None else None
    if expected is None:  # synthetic training data: its ids are the task's, nothing to compare
        return
    if tokenizer_of(theirs) != expected:
        name = ours.get("tokenizer") if ours is not None and tokenizer_of(ours) == expected else (
            "byte" if expected == "byte" else f"the one of sha256 {expected[:12]}...")
        raise ValueError(f"--data {data!r} was tokenized with {theirs.get('tokenizer')!r}, the checkpoint's training "
                         f"data ({trained_on}) with {name!r}; prepare the evaluation text with that tokenizer "
                         "(longctx data prepare --tokenizer ...)")


def _under_torchrun() -> bool:
    """This process is one rank of torchrun's world (what launch/env.py's process_group will join), not a
    command run on its own (or inside a rank that already has its process group)."""
    import torch.distributed as dist

    from .launch.env import env_world

    return not dist.is_initialized() and env_world() is not None


def _ranks(args) -> tuple[int, str]:
    """How many ranks will run the command, and what sets that: torchrun's world, else --nproc."""
    if _under_torchrun():
        from .launch.env import env_world

        return env_world()[1], "torchrun's world size"
    return args.nproc, "--nproc"


def _rank0() -> bool:
    from .launch.env import env_rank

    return not _under_torchrun() or env_rank() == 0  # under torchrun rank 0 prints and writes


def _checked_checkpoint(args):
    """The checks every command on a checkpoint shares, in this process; returns its resolved config."""
    from .eval.weights import check_eval_tp
    from .parallel.sequence.registry import get_strategy

    if get_strategy(args.strategy).name == "hybrid":
        raise ValueError("--strategy hybrid needs a (ring, ulysses) mesh, which evaluation does not build; use "
                         "ulysses, allgather or a ring-family strategy (zigzag, striped, ring)")
    if not os.path.exists(args.checkpoint):
        raise ValueError(f"--checkpoint {args.checkpoint!r} does not exist; give a checkpoint directory "
                         "(step_NNNNNNNN) or a checkpoint root (run_dir/checkpoints)")
    ranks, what = _ranks(args)
    if ranks % args.tp:
        raise ValueError(f"--tp {args.tp} does not divide {what} {ranks}: the ranks are {what}/--tp "
                         f"context-parallel groups of --tp tensor-parallel ranks; choose a divisor of {ranks}")
    from .config import load
    from .train.checkpoint_dirs import locate

    # one checkpoint for every check and for the ranks: a root's newest changes while a run still trains into it
    args.checkpoint_dir = locate(args.checkpoint, f"--checkpoint {args.checkpoint!r}", log=lambda *a, **k: None)
    cfg = load(path=os.path.join(args.checkpoint_dir, "config.yaml"))  # written resolved: an HF model's sizes
    if cfg.model.dilated.layers:  # prefill, decoding and perplexity run the causal/windowed cores only
        raise ValueError(f"this checkpoint's model has dilated (LongNet) attention layers (model.dilated.layers="
                         f"{list(cfg.model.dilated.layers)}), which generation and evaluation do not run; "
                         "`longctx checkpoint export` still gives its weights")
    check_eval_tp(cfg, args.tp)
    if cfg.model.hf_path:  # the architecture comes from there: still there, before any rank starts
        from .model.hf_checks import check_generation_rope, read_hf_config

        hf_config = read_hf_config(cfg.model.hf_path)
        # perplexity pins a self-rescaling RoPE to --seq-len (eval.ppl); generation cannot, on any number of ranks
        if getattr(args, "eval_command", None) != "ppl":
            check_generation_rope(hf_config)
    strategy = get_strategy(args.strategy)  # its head split over the context ranks, before any rank starts
    strategy.check(seq_len=None, world=ranks // args.tp, layout=strategy.layout(), heads=cfg.model.n_heads // args.tp)
    return cfg


def _on_ranks(kind: str, params: dict, nproc: int):
    from .launch import run
    from .launch.entry import EVAL_TIMEOUT_S, eval_main

    if nproc > 1 and not _under_torchrun():  # under torchrun this process is already one of the ranks
        # the same collective timeout as under torchrun (run()'s default is a test's 60 s)
        return run(eval_main, nproc, args=(kind, params), timeout=24 * 3600.0, pg_timeout=EVAL_TIMEOUT_S)[0]
    return eval_main(kind, params)


def cmd_eval(args) -> int:
    from .eval.needle import BATCH, check_grid, check_lengths, format_table, write_needle
    from .eval.ppl import format_ppl

    kind = args.eval_command
    params = {k: getattr(args, k, None) for k in ("checkpoint", "lengths", "depths", "samples", "decode", "strategy",
                                                   "data", "seq_len", "sequences", "buckets", "tp")}
    with checking():
        check_output(args.json, "--json")
        if kind == "needle":
            check_plot(args.plot)
            check_distinct(args.json, args.plot)
            check_grid(args.lengths, args.depths, args.samples)
        cfg = _checked_checkpoint(args)
        params["checkpoint"] = args.checkpoint_dir
        if kind == "needle":
            check_lengths(cfg, args.lengths)
            _check_memory(args, cfg, rows=min(args.samples, BATCH), tokens=max(args.lengths) + cfg.data.digits,
                          what=f"--lengths {max(args.lengths)}")
        if kind == "ppl":
            params["data"], params["first"], params["sequences"], what = _check_ppl_args(args, cfg)
            if what and _rank0():
                print(f"longctx: eval ppl reads {what}", flush=True)
            seq_len = args.seq_len or cfg.train.seq_len
            _check_memory(args, cfg, rows=2, tokens=seq_len, logits=True, what=f"--seq-len {seq_len}")
    records = _on_ranks(kind, params, args.nproc)
    if not _rank0():
        return 0
    if kind == "needle":
        print(format_table(records))
        write_needle(records, args.json, args.plot)
    else:
        print(format_ppl(records))
        if args.json:
            write_json(args.json, records, indent=1)
    return 0


def _check_memory(args, cfg, *, rows: int, tokens: int, what: str, logits: bool = False) -> None:
    from .launch.env import local_world_size
    from .train.machine import check_eval_memory

    ranks = _ranks(args)[0]
    check_eval_memory(cfg.model, rows=rows, tokens=tokens, ranks=ranks // args.tp, tp=args.tp, logits=logits,
                      what=what, local_ranks=local_world_size(ranks))


def _checked_generate(args):
    """(tokenizer or None, prompt token ids, end-of-sequence ids) after every check of `longctx generate`'s
    arguments."""
    import math

    from .eval.weights import checkpoint_tokenizer

    if not args.prompts:
        raise ValueError("nothing to continue: give --prompt TEXT or --ids 5,9,12 (each may be repeated)")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: must be a finite number >= 0 (0: greedy)")
    check_output(args.json, "--json")
    cfg = _checked_checkpoint(args)
    tok = checkpoint_tokenizer(cfg, args.tokenizer)
    if any(kind == "text" for kind, _ in args.prompts) and tok is None:
        from .data.tokenizer import ByteTokenizer

        fits = "--tokenizer byte / a tokenizer.json" if cfg.model.vocab_size >= ByteTokenizer.vocab_size else \
            f"--tokenizer with a tokenizer.json of at most {cfg.model.vocab_size} ids (model.vocab_size)"
        raise ValueError(f"--prompt is text, but this checkpoint trained on data.source={cfg.data.source!r} (no "
                         f"tokenizer recorded); give its token ids with --ids, or {fits}")
    prompts = [tok.encode(value) if kind == "text" else list(value) for kind, value in args.prompts]
    vocab = cfg.model.vocab_size
    for i, ids in enumerate(prompts):
        if not ids:
            raise ValueError(f"prompt {i} is empty; give at least one token")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"prompt {i} has token id {max(ids) if max(ids) >= vocab else min(ids)}, outside the "
                             f"model's vocabulary 0..{vocab - 1}")
    longest = max(len(ids) for ids in prompts)
    _check_memory(args, cfg, rows=len(prompts), tokens=longest + args.max_new_tokens,
                  what=f"a {longest}-token prompt + --max-new-tokens {args.max_new_tokens}")
    if args.top_k is not None and args.temperature == 0:
        raise ValueError(f"--top-k {args.top_k} samples among the k likeliest tokens, but --temperature 0 (the "
                         "default) is greedy: give --temperature > 0 (e.g. 0.8), or leave --top-k out")
    if args.seed is not None and args.temperature == 0:
        raise ValueError(f"--seed {args.seed} seeds sampling, but --temperature 0 (the default) is greedy and draws "
                         "nothing: give --temperature > 0 (e.g. 0.8), or leave --seed out")
    if args.top_k is not None and not 1 <= args.top_k <= vocab:
        raise ValueError(f"--top-k {args.top_k}: must be between 1 and the model's vocabulary size {vocab} (leave it "
                         "out to sample from every token)")
    return tok, prompts, _eos_ids(tok, cfg)


def _eos_ids(tok, cfg) -> list[int]:
    """Where a row stops: the tokenizer's end of document, and a Hugging Face model's own end tokens (its
    generation_config.json, else config.json: eos_token_id, one id or several), as transformers stops."""
    ids = [tok.eos_id] if tok is not None and tok.eos_id is not None else []
    if cfg.model.hf_path:
        from .model.hf_checks import model_eos_ids

        ids += model_eos_ids(cfg.model.hf_path)
    return sorted(set(ids))


def cmd_generate(args) -> int:
    with checking():
        tok, prompts, eos_ids = _checked_generate(args)
    params = {"checkpoint": args.checkpoint_dir, "prompts": prompts, "max_new_tokens": args.max_new_tokens,
              "temperature": args.temperature, "top_k": args.top_k, "seed": args.seed or 0, "strategy": args.strategy,
              "decode": args.decode, "tp": args.tp, "eos_id": eos_ids}
    outputs = _on_ranks("generate", params, args.nproc)
    if not _rank0():
        return 0
    records = []
    for i, (ids, new) in enumerate(zip(prompts, outputs)):
        text = tok.decode(new) if tok is not None else None
        records.append({"prompt_ids": ids, "ids": new, "prompt": tok.decode(ids) if tok is not None else None,
                        "text": text})
        print(f"--- {i}: {len(ids)} prompt tokens, {len(new)} new")
        print(text if text is not None else ",".join(map(str, new)))
    if args.json:
        write_json(args.json, records, indent=1)
    return 0

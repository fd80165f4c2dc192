"""Perplexity by position bucket on held-out token data: does the model use its context?

Sequences are packed windows of a prepared dataset (document boundaries kept, so a position is the
token's position inside its document). Every rank of the process group holds a context shard of each
sequence (the strategy's layout); per-token losses are summed into equal-width position buckets and
all-reduced, so the numbers do not depend on how many ranks ran it. A model split over tensor-parallel
ranks (longctx.eval.load_checkpoint_model with a mesh) returns its logits split by vocabulary; each token's
loss then comes from two small all-reduces over tp, and `group` is the mesh's cp group.
"""

from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from ..data.labels import IGNORE_INDEX
from ..data.tokens import TokenSource, identity
from ..model.hf import pin_rope_length
from ..model.parallelize import context_parallel
from ..parallel.sequence.documents import Documents
from ..parallel.sequence.registry import get_strategy
from ..parallel.tensor import local_tensor, tp_comm, vocab_parallel_token_losses


@torch.no_grad()
def perplexity_by_position(model, data_path: str, *, seq_len: int, sequences: int = 8, buckets: int = 8,
                           strategy: str = "zigzag", batch: int = 2, first: int = 0, group=None) -> list[dict]:
    """[{bucket_start, bucket_end, tokens, loss, ppl}], positions inside documents, over `sequences` windows
    read in order from window `first` (no shuffling: held-out data is read as it lies). `group`: the
    context-parallel ranks (None: the world); with a tensor-parallel model, the cp group of its mesh."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    rank = dist.get_rank(group) if dist.is_initialized() else 0
    # a longctx Transformer's tp is sequence-parallel (the prompt splits over tp too); an HF model's is not
    tp = tp_comm(model.layers[0].attention.wq.weight) if hasattr(model, "tok_embeddings") else None
    src = check_ppl(data_path, seq_len=seq_len, sequences=sequences, buckets=buckets, strategy=strategy, world=world,
                    vocab_size=model.cfg.vocab_size, first=first, tp=tp.world if tp is not None else 1)
    # an HF model's self-rescaling RoPE (dynamic, longrope) is pinned to seq_len, as training pins it to its own:
    # every rank, batch and packing then rotates by the frequencies of one unpacked seq_len-token window
    if world > 1:  # for this call only: the model is handed back unchanged
        scope = context_parallel(model, strategy, group, rope_length=seq_len)
    else:
        scope = contextlib.nullcontext()
        if hasattr(model, "hf"):
            pin_rope_length(model.hf, seq_len)
    with scope:
        return _perplexity(model, src, seq_len, sequences, buckets, strategy, batch, first, group, world, rank)


def _perplexity(model, src, seq_len, sequences, buckets, strategy, batch, first, group, world, rank) -> list[dict]:
    layout = get_strategy(strategy).layout()
    pos = get_strategy(strategy).rank_positions(layout, seq_len, world, rank) if world > 1 else torch.arange(seq_len)
    device = local_tensor(next(model.parameters())).device
    # bucket i: positions ceil(i L / B) .. ceil((i+1) L / B) - 1, every one non-empty (B <= L) and widths within one
    edges = [-(-i * seq_len // buckets) for i in range(buckets + 1)]
    sums = torch.zeros(buckets, dtype=torch.float64)
    counts = torch.zeros(buckets, dtype=torch.float64)
    for start in range(first, first + sequences, batch):
        b = src.batch(range(start, min(first + sequences, start + batch)))
        docs = Documents.from_ids(b["doc_ids"])
        logits = model(b["input_ids"][:, pos].to(device), pos.to(device), documents=docs)
        labels = b["labels"][:, pos]
        if isinstance(logits, DTensor):  # split by vocabulary over tp
            loss = vocab_parallel_token_losses(logits, labels.to(device), ignore_index=IGNORE_INDEX).cpu().double()
        else:
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten().to(device), reduction="none",
                                   ignore_index=IGNORE_INDEX).view_as(labels).cpu().double()
        where = (docs.rope_positions(pos) * buckets // seq_len).expand_as(labels)
        ok = labels != IGNORE_INDEX
        sums.index_add_(0, where[ok], loss[ok])
        counts.index_add_(0, where[ok], torch.ones_like(loss[ok]))
    if world > 1:  # over the cp ranks (tp ranks hold the same tokens' losses already)
        both = torch.stack([sums, counts]).to(device)
        dist.all_reduce(both, group=group)
        sums, counts = both.cpu()
    return bucket_records(sums, counts, edges)


def bucket_records(sums, counts, edges) -> list[dict]:
    """The records of buckets whose token losses add up to `sums` over `counts` tokens: a bucket no token reached
    has no loss (None: JSON null, not NaN); a perplexity past e^700 is given as e^700, as validation gives it (a
    diverged run's loss of 2000 overflowed a float and lost the whole evaluation)."""
    out = []
    for i in range(len(counts)):
        mean = float(sums[i] / counts[i]) if counts[i] else None
        out.append({"bucket_start": edges[i], "bucket_end": edges[i + 1], "tokens": int(counts[i]),
                    "loss": mean, "ppl": math.exp(min(mean, 700.0)) if mean is not None else None})
    return out


def format_ppl(records: list[dict]) -> str:
    """The table `longctx eval ppl` prints, with a note on buckets that hold no token."""
    lines = []
    for r in records:
        where = f"positions {r['bucket_start']:>7}-{r['bucket_end']:<7} tokens {r['tokens']:>9}  "
        lines.append(where + (f"loss {r['loss']:.4f}  ppl {r['ppl']:.3f}" if r["loss"] is not None else "no tokens"))
    empty = [r for r in records if r["loss"] is None]
    if empty:
        reached = max((r["bucket_end"] for r in records if r["loss"] is not None), default=0)
        lines.append(f"note: {len(empty)} bucket(s) hold no tokens: positions count from each document's start, and "
                     f"no document read has a labelled token past position {reached}; use a shorter --seq-len or "
                     "fewer --buckets")
    return "\n".join(lines)


def held_out(cfg, seq_len: int, trained: dict | None = None) -> tuple[str | None, int, str]:
    """(dataset, first window of `seq_len` tokens, what it is) that `eval ppl` reads without --data: what the
    run held out of training (validation.path; the last validation.holdout windows of data.path, from the first
    `seq_len` window wholly past the last token training read), else data.path itself, which training read.
    `trained`: the checkpoint's record of data.path (data.tokens.identity); a dataset prepared again since then
    no longer ends in the held-out windows, and is refused."""
    validation = cfg.validation
    if validation.path:
        return validation.path, 0, f"validation.path {validation.path} (the run's held-out documents)"
    if cfg.data.source == "tokens" and cfg.data.path and validation.holdout:
        try:  # training's windows, as its TokenSource cut them
            training = TokenSource(cfg.data.path, seq_len=cfg.train.seq_len, seed=0, vocab_size=cfg.model.vocab_size,
                                   what="the checkpoint's data.path")
        except FileNotFoundError as e:  # moved since training: one line, like any other dataset that is not there
            relative = "" if os.path.isabs(cfg.data.path) else (f" (a relative path, read from the current directory, "
                                                                 f"{os.getcwd()}: run from where it trained)")
            raise ValueError(f"{e}{relative}; or pass held-out text with --data") from None
        now = identity(training.meta)
        if trained is not None and now != trained:
            changed = ", ".join(f"{k} {trained.get(k)} -> {now[k]}" for k in now if trained.get(k) != now[k])
            raise ValueError(f"the checkpoint's data.path {cfg.data.path} was prepared again since it trained on it "
                             f"({changed}): its last windows are not the ones held out of training; pass held-out "
                             "text with --data")
        first_token = (training.total_windows - validation.holdout) * cfg.train.seq_len
        return cfg.data.path, -(-first_token // seq_len), (f"data.path {cfg.data.path} from token {first_token:,}: "
                                                            f"its last {validation.holdout} training windows of "
                                                            f"{cfg.train.seq_len} tokens, held out of training")
    return cfg.data.path, 0, (f"data.path {cfg.data.path}, which this model trained on (no validation.holdout or "
                              "validation.path): a perplexity of training text; pass held-out text with --data")


def check_ppl(data_path: str | None, *, seq_len: int, sequences: int, buckets: int, strategy: str, world: int,
              vocab_size: int, first: int = 0, tp: int = 1, what: str = "--data") -> TokenSource:
    """Every argument of perplexity_by_position that can be wrong, checked without a model (the launching
    process calls it, so a bad --data is one line rather than a traceback from every rank)."""
    if not data_path:
        raise ValueError("--data is needed: the checkpoint's config has no data.path (it trained on synthetic "
                         "data); pass a dataset made by `longctx data prepare`")
    if buckets < 1 or sequences < 1:
        raise ValueError(f"--buckets {buckets} and --sequences {sequences} must be >= 1")
    if seq_len < buckets:
        raise ValueError(f"--buckets {buckets} is more than the {seq_len} positions of a sequence (--seq-len); give "
                         f"at most {seq_len} buckets")
    try:
        src = TokenSource(data_path, seq_len=seq_len, seed=0, vocab_size=vocab_size, shuffle=False, what=what)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
    if world > 1:
        get_strategy(strategy).check(seq_len=seq_len, world=world, layout=get_strategy(strategy).layout(),
                                     what="--seq-len")
    if tp > 1 and seq_len % (world * tp):
        raise ValueError(f"--seq-len {seq_len}: each of the {world} context-parallel shards is split over the {tp} "
                         f"tensor-parallel ranks (sequence parallelism); use a multiple of {world * tp}")
    if src.n_sequences - first < 1:
        raise ValueError(f"the dataset has {src.n_sequences} windows of {seq_len} tokens; nothing from window {first} "
                         "(a shorter --seq-len fits more windows)")
    if sequences > src.n_sequences - first:  # asked for more than there is: say so rather than do less
        raise ValueError(f"--sequences {sequences}: the dataset has {src.n_sequences - first} windows of {seq_len} "
                         f"tokens; give --sequences {src.n_sequences - first} or fewer (or a shorter --seq-len)")
    return src

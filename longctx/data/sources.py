"""The one place a config's `data` section becomes a source: synthetic | tokens | passkey | needle | recall.

A source maps global sequence indices to a batch dict (input_ids, labels and, for packed token data,
doc_ids), each sequence a function of its index, so every layout and data-parallel split reads the same
data and resuming needs only the step.
"""

from __future__ import annotations

from .synthetic import SyntheticSource
from .tasks import RETRIEVAL, RetrievalTask
from .tokens import TokenSource, read_meta, tokenizer_of

SOURCES = ("synthetic", "tokens", *RETRIEVAL)
# added to train.seed for validation: the generated sources draw held-out sequences from a stream of their own
VALIDATION_SEED_OFFSET = 1_000_003


def packs_documents(data) -> bool:
    """Whether a data section's sequences hold several documents (boundaries every schedule must respect):
    prepared token data, and the retrieval tasks with data.pack_min > 0."""
    return data.source == "tokens" or (data.source in RETRIEVAL and bool(data.pack_min))


def build_source(data, *, seq_len: int, vocab_size: int, seed: int, holdout: int = 0):
    """`data`: the config's data section. ValueError (naming the key) for anything it cannot serve.
    `holdout` (token data): the last windows of data.path that training never reads (validation.holdout)."""
    if data.source not in SOURCES:
        raise ValueError(f"data.source={data.source!r}: choose one of {', '.join(SOURCES)}")
    if holdout and data.source != "tokens":
        raise ValueError(f"validation.holdout applies to data.source=tokens; data.source={data.source} draws its "
                         "validation sequences from a seed of their own: drop validation.holdout")
    if data.source == "synthetic":
        return SyntheticSource(task=data.task, seq_len=seq_len, vocab_size=vocab_size, seed=seed,
                               alphabet=data.alphabet, period=data.period, mask_prompt=data.mask_prompt)
    if data.source == "tokens":
        if not data.path:
            raise ValueError("data.source=tokens needs data.path=DIR (a directory made by longctx data prepare)")
        source = TokenSource(data.path, seq_len=seq_len, seed=seed, vocab_size=vocab_size, shuffle=data.shuffle)
        total = source.total_windows
        if holdout >= total:
            fix = (f"hold out fewer (e.g. validation.holdout={max(total // 20, 1)})" if total > 1 else
                   "one window cannot be split: give a shorter train.seq_len, more data, or held-out data of its own "
                   "(validation.path=DIR) instead of validation.holdout")
            raise ValueError(f"validation.holdout={holdout} windows leave nothing to train on: data.path holds {total} "
                             f"window{'s' if total != 1 else ''} of {seq_len} tokens; {fix}")
        return source.restricted(0, total - holdout) if holdout else source
    return RetrievalTask(kind=data.source, seq_len=seq_len, vocab_size=vocab_size, seed=seed, alphabet=data.alphabet,
                         digits=data.digits, depth=data.depth, pairs=data.pairs, pack_min=data.pack_min,
                         haystack=data.haystack)


def build_validation_source(data, validation, *, seq_len: int, vocab_size: int, seed: int, batch_size: int):
    """Held-out sequences for the loss during training (`validation` section). Token data reads its own
    prepared directory in order (never the training data: the same documents would measure memorisation);
    the generated sources draw the same task from another seed. ValueError naming the key otherwise."""
    import os

    if data.source != "tokens":
        if validation.path:
            raise ValueError(f"validation.path applies to data.source=tokens; data.source={data.source} draws its "
                             "validation sequences from a seed of their own: drop validation.path")
        return build_source(data, seq_len=seq_len, vocab_size=vocab_size, seed=seed + VALIDATION_SEED_OFFSET,
                            holdout=validation.holdout)  # (a holdout is refused there, by name)
    if validation.path and validation.holdout:
        raise ValueError("validation.path and validation.holdout both say where the held-out data are: give one")
    if validation.holdout:  # the last windows of the training data, which training does not read
        training = build_source(data, seq_len=seq_len, vocab_size=vocab_size, seed=seed, holdout=validation.holdout)
        total = training.total_windows
        source = training.restricted(total - validation.holdout, total, shuffle=False)
        where = f"validation.holdout={validation.holdout}"
    else:
        if not validation.path:
            raise ValueError("validation.interval > 0 with data.source=tokens needs held-out data: "
                             "validation.holdout=N (the last N windows of data.path, which training then skips) or "
                             "validation.path=DIR (other documents, prepared like the training data)")
        if data.path and os.path.realpath(validation.path) == os.path.realpath(data.path):
            raise ValueError(f"validation.path={validation.path!r} is the training data (data.path); give held-out "
                             "documents (longctx data prepare --input HELD_OUT --output DIR), or validation.holdout=N")
        source = TokenSource(validation.path, seq_len=seq_len, seed=seed, vocab_size=vocab_size, shuffle=False,
                             what="validation.path")
        if data.path:
            training = read_meta(data.path)
            if tokenizer_of(source.meta) != tokenizer_of(training):  # its loss would be of other text
                raise ValueError(f"validation.path={validation.path!r} was tokenized with "
                                 f"{source.meta.get('tokenizer')!r}, data.path={data.path!r} with "
                                 f"{training.get('tokenizer')!r}; prepare the held-out documents with data.path's "
                                 "tokenizer (longctx data prepare --tokenizer ...)")
        where = "validation.path"
    need = validation.batches * batch_size
    if need > source.n_sequences:
        held = where.startswith("validation.holdout")
        more = f"hold out {need} windows (validation.holdout={need})" if held else \
            "prepare more held-out documents into validation.path"
        fits = source.n_sequences // batch_size
        fix = f"set validation.batches={fits}, or {more}" if fits else f"{more}, or lower train.batch_size"
        raise ValueError(f"validation.batches={validation.batches} x train.batch_size={batch_size} needs {need} "
                         f"sequences of {seq_len} tokens; {where} holds {source.n_sequences}: {fix}")
    return source

"""`longctx data prepare`: local text / JSONL / Parquet files -> a memory-mapped token dataset.

Files are tokenized in parallel worker processes (one file per task, results kept in input order; at most
min(workers, input files, CPU count) processes, as more would only wait) and
written as tokens.bin + offsets.npy + meta.json (the format tokens.py reads). Input problems never stop a
run half-way: each is reported with its file (and line) and skipped, and counted in the summary; with
`strict` the first problems are reported and nothing is written. The output is assembled in a temporary
directory next to the target and swapped in at the end, so re-running over the same output is safe and an
interrupted run leaves the previous dataset intact.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .._messages import first_line
from .._paths import blocking_file, check_output, replace_dir
from .tokenizer import EOS_TOKENS, load_tokenizer
from .tokens import FILES

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


class PrepareError(ValueError):
    """Bad input for `data prepare` (printed as one line by the command)."""


def expand_inputs(patterns) -> list[str]:
    """Paths, globs and directories (recursively, through links) -> sorted files, each once however it was
    named; an empty match is an error. A path that exists is itself, brackets in its name included."""
    files = []
    for pat in [patterns] if isinstance(patterns, str) else patterns:
        is_glob = any(c in pat for c in "*?[") and not os.path.exists(pat)
        matches = sorted(glob.glob(pat, recursive=True)) if is_glob else [pat]
        if not matches or not os.path.lexists(matches[0]):  # a broken link matched is read, and reported, below
            raise PrepareError(f"--input {pat!r} matches no file; give a file, a directory or a glob like "
                               "'data/*.jsonl'")
        for m in matches:
            if os.path.isdir(m):
                files += sorted(os.path.join(r, f) for r, _, fs in _walk_visible(m) for f in fs)
            else:
                files.append(m)
    unique = {}
    for f in files:
        unique.setdefault(os.path.realpath(f), f)
    return list(unique.values())


def _walk_visible(root: str):
    """os.walk without hidden entries below `root` (.git, editor files, the .prepare-* directory an interrupted
    `data prepare` leaves beside its output, which a rerun would otherwise read as input), following links to
    directories (as a glob does) but into each real directory once, so a link loop ends."""
    seen = {os.path.realpath(root)}
    for here, dirs, names in os.walk(root, followlinks=True):
        visible = sorted(d for d in dirs if not d.startswith("."))
        dirs[:] = [d for d in visible if os.path.realpath(os.path.join(here, d)) not in seen]
        seen.update(os.path.realpath(os.path.join(here, d)) for d in dirs)
        yield here, dirs, [n for n in names if not n.startswith(".")]


class Problem(str):
    """A skipped part of the input, with its reason."""


def _documents(path: str, text_key: str):
    """Yield (line or None, text) per document, or (line, Problem message) for a skipped part."""
    try:
        empty = os.path.getsize(path) == 0
    except OSError as e:  # a broken link, a file removed meanwhile, no permission
        yield None, Problem(f"cannot be read ({e.strerror or type(e).__name__})")
        return
    if empty:
        yield None, Problem("empty file")
        return
    kind = path.lower()  # DATA.JSONL is JSON lines too
    if kind.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            yield None, Problem("Parquet needs pyarrow: pip install 'longctx[data]'")
            return
        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported, not raised
            yield None, Problem(f"not a readable Parquet file ({type(e).__name__})")
            return
        if text_key not in table.column_names:
            yield None, Problem(f"no column {text_key!r} (columns: {', '.join(table.column_names)}); "
                                "choose one with --text-key")
            return
        for i, text in enumerate(table.column(text_key).to_pylist()):
            yield i + 1, text if isinstance(text, str) else Problem(f"{text_key!r} is not a string")
        return
    try:
        f = open(path, "rb")
    except OSError as e:
        yield None, Problem(f"cannot be read ({e.strerror or type(e).__name__})")
        return
    with f:
        if kind.endswith(JSONL_SUFFIXES):  # a NUL byte is invalid JSON: that line alone is skipped
            yield from _json_lines(f, text_key)
            return
        data = f.read()
        if b"\x00" in data:
            yield None, Problem("binary file (NUL bytes), not text")
            return
        try:
            text = data.decode("utf-8-sig")  # a byte-order mark (Windows editors) is no part of the text
        except UnicodeDecodeError as e:
            yield None, Problem(f"not UTF-8 text (byte {e.start})")
            return
        yield None, text  # a plain text file is one document


def _json_lines(f, text_key: str):
    """_documents for an open JSON-lines file, read a record at a time (a corpus file need not fit in memory
    twice over); a line that is not UTF-8 is skipped alone. Records end at b"\n" only: str.splitlines would
    also cut at U+2028/U+2029/U+0085, which JSON strings may hold raw (json.dumps(ensure_ascii=False))."""
    end = 0
    for n, raw in enumerate(f, 1):
        start, end = end, end + len(raw)
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")  # a byte-order mark is no part of the text
        except UnicodeDecodeError as e:
            yield n, Problem(f"not UTF-8 text (byte {start + e.start})")
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            yield n, Problem(f"not valid JSON ({e.msg})")
            continue
        if not isinstance(record, dict):
            yield n, Problem(f"not a JSON object (a {type(record).__name__}); each line must be an object holding "
                             f"the text under {text_key!r}")
            continue
        if text_key not in record:
            yield n, Problem(f"no key {text_key!r} (has: {', '.join(record)}); choose the text field with --text-key")
            continue
        if not isinstance(record[text_key], str):
            yield n, Problem(f"{text_key!r} is not a string")
            continue
        yield n, record[text_key]


@functools.lru_cache(maxsize=2)
def _tokenizer(spec: str):
    """One load per worker process, not per file: a large tokenizer.json takes most of a second to parse and
    hash, and a corpus of one document per file would spend its time there."""
    return load_tokenizer(spec)


def tokenize_file(path: str, tokenizer_spec: str, text_key: str, add_eos: bool, dtype=np.uint32):
    """-> (tokens as `dtype`, document lengths, [(path, line, reason), ...]). Runs in a worker process; each
    document's ids become `dtype` at once (a list of Python ints costs ~36 bytes a token)."""
    tok = _tokenizer(tokenizer_spec)
    docs, lengths, problems = [], [], []
    for line, doc in _documents(path, text_key):
        if isinstance(doc, Problem):
            problems.append((path, line, str(doc)))
            continue
        if not doc:
            problems.append((path, line, "empty document"))
            continue
        try:
            doc.encode("utf-8")
        except UnicodeEncodeError as e:  # JSON's "\ud83d" escapes decode to a lone surrogate no tokenizer takes
            problems.append((path, line, f"unpaired surrogate (U+{ord(doc[e.start]):04X} at character {e.start})"))
            continue
        try:
            toks = tok.encode(doc)
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception (a WordLevel without [UNK])
            problems.append((path, line, f"the tokenizer cannot encode it ({first_line(e, limit=200)})"))
            continue
        if not toks:  # whitespace a tokenizer drops: a document of nothing but its end-of-document token
            problems.append((path, line, "empty after tokenization"))
            continue
        if add_eos and tok.eos_id is not None:
            toks.append(tok.eos_id)
        ids = np.asarray(toks, dtype=np.int64)
        if int(ids.max()) >= tok.vocab_size or int(ids.min()) < 0:  # would wrap in `dtype`: other tokens, silently
            problems.append((path, line, f"token id {int(ids.max())} outside the tokenizer's vocabulary of "
                                         f"{tok.vocab_size} ids"))
            continue
        docs.append(ids.astype(dtype))
        lengths.append(len(toks))
    return (np.concatenate(docs) if docs else np.zeros(0, dtype)), lengths, problems


def _in_order(pool, fn, calls, ahead: int):
    """pool.map's results in input order with at most `ahead` calls submitted and not yet read: map submits
    every file at once and holds each finished result until its turn (a slow early file would keep the
    corpus's tokens in memory), and a --strict stop would still tokenize everything submitted."""
    queue = collections.deque()
    for args in calls:
        queue.append(pool.submit(fn, *args))
        if len(queue) >= ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()


def _histogram(lengths) -> dict:
    """Documents per power-of-two length bucket: {'<=16': n, ...}."""
    hist = collections.Counter(1 << max(0, int(np.ceil(np.log2(max(1, n))))) for n in lengths)
    return {f"<={k}": hist[k] for k in sorted(hist)}


def _check_output(output: str) -> None:
    """The output path must be given, creatable (no file among its parents), and, when it exists, a prepared
    dataset (its files and nothing else: replaced) or an empty directory, not a mount point (it cannot be
    renamed)."""
    if not output or not output.strip():
        raise PrepareError("--output is empty; give the directory to write the dataset to, e.g. --output data/ds")
    blocker = blocking_file(output)
    if blocker is not None:
        raise PrepareError(f"--output {output!r}: {blocker} is a file, not a directory, so nothing can be created "
                           "under it; choose an output path whose parents are directories (or move that file)")
    if os.path.exists(output) and (not os.path.isdir(output) or not set(os.listdir(output)) <= set(FILES)):
        raise PrepareError(f"--output {output!r} exists and is not a prepared dataset (one holds {', '.join(FILES)} "
                           "and nothing else); refusing to replace it: choose a new directory or remove it")
    if os.path.ismount(output):
        raise PrepareError(f"--output {output!r} is a mount point, which cannot be swapped for the finished dataset; "
                           f"give a directory inside it, e.g. --output {os.path.join(output, 'ds')}")
    try:
        check_output(output, "--output", "dir")  # writable here (permissions, read-only mounts, /proc)
    except ValueError as e:
        raise PrepareError(str(e)) from None


def _swap_in(tmp: str, output: str) -> None:
    """Put the finished dataset `tmp` at `output`; a dataset there is exchanged with it in one step (Linux's
    renameat2 RENAME_EXCHANGE), so no instant leaves `output` missing; where the filesystem cannot, in two
    renames, the previous one kept as OUTPUT.old-PID if the process dies between them."""
    _check_output(output)  # again: it may have changed while tokenizing
    replace_dir(tmp, output)


def prepare(inputs, output: str, *, tokenizer: str = "byte", text_key: str = "text", workers: int = 1,
            strict: bool = False, add_eos: bool = True, progress: bool = True) -> dict:
    """Tokenize `inputs` into `output`; returns the summary written to meta.json.

    `workers` (>= 1) caps the tokenizer processes: min(workers, input files, CPU count) run, as each takes
    whole files and more than the CPUs would only wait."""
    from tqdm import tqdm

    if workers < 1:
        raise PrepareError(f"--workers must be >= 1, got {workers}")
    _check_output(output)  # before any work: a bad output path fails now, not after tokenizing
    output = os.path.realpath(output)  # a link to a dataset: the dataset is replaced, not the link
    tok = load_tokenizer(tokenizer)  # a bad tokenizer fails here, before any worker starts
    files = expand_inputs(inputs)
    files = [f for f in files if not os.path.realpath(f).startswith(output + os.sep)]  # never read our own output
    if text_key != "text" and not any(f.lower().endswith((*JSONL_SUFFIXES, ".parquet")) for f in files):
        raise PrepareError(f"--text-key {text_key!r} names the text field of JSON lines and Parquet inputs, and none "
                           f"of the {len(files)} input files is one (a text file is one document as it is): drop "
                           "--text-key, or give the .jsonl / .parquet files")
    parent = os.path.dirname(output) or "."
    os.makedirs(parent, exist_ok=True)
    processes = max(1, min(workers, len(files), os.cpu_count() or 1))
    dtype = np.uint16 if tok.vocab_size <= 2**16 else np.uint32
    _remove_abandoned(parent)
    tmp = tempfile.mkdtemp(prefix=f".prepare-{_HOST}-{os.getpid()}-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would leave the dataset unreadable to other users
    try:
        problems, lengths, n_tokens = [], [], 0
        with open(os.path.join(tmp, "tokens.bin"), "wb") as sink, \
                ProcessPoolExecutor(max_workers=processes) as pool:
            results = _in_order(pool, tokenize_file, [(f, tokenizer, text_key, add_eos, dtype) for f in files],
                                ahead=2 * processes)
            for ids, lens, probs in tqdm(results, total=len(files), desc="tokenizing", unit="file",
                                         disable=not progress):
                problems += probs
                if strict and problems:
                    break
                sink.write(ids.tobytes())
                lengths += lens
                n_tokens += int(ids.size)
        if strict and problems:
            path, line, why = problems[0]
            where = f"{path}:{line}" if line else path
            raise PrepareError(f"{where}: {why} (--strict: nothing written; without --strict such input is skipped)")
        if not lengths:
            raise PrepareError(_nothing_read(problems, len(files)))
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        np.save(os.path.join(tmp, "offsets.npy"), offsets)
        reasons = collections.Counter(why.split(" (")[0] for _, _, why in problems)
        summary = {"files": len(files), "documents": len(lengths), "tokens": n_tokens, "dtype": np.dtype(dtype).name,
                   "tokenizer": tok.name, "tokenizer_sha256": tok.sha256, "vocab_size": tok.vocab_size,
                   "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                   "skipped": len(problems), "skipped_by_reason": dict(reasons),
                   "problems": [{"file": p, "line": ln, "reason": r} for p, ln, r in problems[:1000]],
                   "length_histogram": _histogram(lengths), "text_key": text_key}
        if add_eos and tok.eos_id is None:
            summary["note"] = (f"the tokenizer has none of {', '.join(EOS_TOKENS)}: documents are packed with no "
                               "end-of-document token between them (--no-eos says so on purpose)")
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(summary, f, indent=1)
        assert all(os.path.exists(os.path.join(tmp, name)) for name in FILES)
        _swap_in(tmp, output)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return summary


_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"
_TEMP = re.compile(r"^\.prepare-(.+)-(\d+)-[^-]+$")


def _remove_abandoned(parent: str) -> None:
    """Delete the working directories of prepares killed before they finished (SIGKILL, OOM): named by host and
    process id, they are only this host's, of processes no longer running (another host's, on a shared
    filesystem, may still be working)."""
    for name in os.listdir(parent):
        match = _TEMP.match(name)
        if not match or match.group(1) != _HOST:
            continue
        try:
            os.kill(int(match.group(2)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # someone else's live process
        shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        print(f"longctx: removed {os.path.join(parent, name)}, left by an interrupted data prepare", file=sys.stderr)


def _nothing_read(problems: list, n_files: int) -> str:
    """One line for a run that found no document: how many were skipped and the first reason."""
    if not problems:
        return (f"the {n_files} input file(s) hold no documents; nothing written" if n_files else
                "--input names no file (an empty directory?); give files, a directory or a glob like 'data/*.jsonl'")
    path, line, why = problems[0]
    where = f"{path}:{line}" if line else path
    more = f" (and {len(problems) - 1} more skipped)" if len(problems) > 1 else ""
    return f"no document could be read from the input; the first problem: {where}: {why}{more}; nothing written"


def format_summary(summary: dict, output: str) -> str:
    lines = [f"prepared {output}: {summary['documents']:,} documents, {summary['tokens']:,} tokens from "
             f"{summary['files']} file(s) ({summary['tokenizer']}, vocab {summary['vocab_size']}, {summary['dtype']})"]
    if summary["skipped"]:
        lines.append(f"skipped {summary['skipped']}: " + ", ".join(f"{k} x{v}" for k, v in
                                                                    summary["skipped_by_reason"].items()))
        for p in summary["problems"][:10]:
            lines.append(f"  {p['file']}{':' + str(p['line']) if p['line'] else ''}: {p['reason']}")
    if summary.get("note"):
        lines.append(f"note: {summary['note']}")
    lines.append("document lengths (tokens): " + ", ".join(f"{k}: {v}" for k, v in summary["length_histogram"].items()))
    return "\n".join(lines)

"""`longctx data prepare`: counts checked against the input written here, malformed input skipped and
reported (or rejected with --strict), safe re-runs, Parquet and tokenizer.json inputs."""

import json
import os

import numpy as np
import pytest

from longctx.cli import main
from longctx.data.prepare import PrepareError, prepare
from longctx.data.tokens import TokenSource


def _corpus(tmp_path, n_docs=3000):
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "délta", "long", "context", "ring", "zigzag"]
    docs = [" ".join(rng.choice(words, size=int(rng.integers(5, 300)))) for _ in range(n_docs)]
    with open(tmp_path / "a.jsonl", "w") as f:
        for d in docs[: n_docs // 2]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    with open(tmp_path / "b.jsonl", "w") as f:
        for d in docs[n_docs // 2:]:
            f.write(json.dumps({"text": d}) + "\n")
    (tmp_path / "c.txt").write_text("a plain text file is one document\n" * 100)
    return docs + ["a plain text file is one document\n" * 100]


def test_prepare_megabytes_of_text_counts_every_document(tmp_path):
    docs = _corpus(tmp_path)
    out = tmp_path / "ds"
    summary = prepare(str(tmp_path / "*"), str(out), workers=2, progress=False)
    sizes = [len(d.encode()) + 1 for d in docs]  # byte tokens and one eos each
    assert summary["tokens"] > 1_000_000 and summary["documents"] == len(docs) and summary["skipped"] == 0
    assert summary["tokens"] == sum(sizes)
    assert sum(summary["length_histogram"].values()) == len(docs)
    tokens = np.memmap(out / "tokens.bin", dtype=summary["dtype"], mode="r")
    offsets = np.load(out / "offsets.npy")
    assert offsets.tolist() == np.concatenate([[0], np.cumsum(sizes)]).tolist()
    first = bytes(tokens[: sizes[0] - 1].tolist()).decode()
    assert first == docs[0] and tokens[sizes[0] - 1] == 256  # eos closes each document
    # file order is kept: the text file's document comes last
    last = bytes(tokens[offsets[-2]: offsets[-1] - 1].tolist()).decode()
    assert last == docs[-1]


def test_malformed_input_is_reported_with_file_and_line_and_skipped(tmp_path):
    (tmp_path / "good.jsonl").write_text(json.dumps({"text": "fine"}) + "\n{not json\n" +
                                         json.dumps({"body": "wrong key"}) + "\n" + json.dumps({"text": 3}) + "\n")
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blob.txt").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "latin.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "late.txt").write_bytes(b"x" * 70_000 + b"\x00")  # past any first-block sniff
    # a raw NUL in line 2 of JSON lines costs that line (invalid JSON), not the file
    (tmp_path / "nul.jsonl").write_bytes(b'{"text": "one"}\n{"text": "bro\x00ken"}\n{"text": "three"}\n')
    summary = prepare(str(tmp_path / "*"), str(tmp_path / "ds"), workers=1, progress=False)
    assert summary["documents"] == 3 and summary["skipped"] == 8
    where = {(os.path.basename(p["file"]), p["line"]): p["reason"] for p in summary["problems"]}
    assert "not valid JSON" in where[("good.jsonl", 2)]
    assert "no key 'text'" in where[("good.jsonl", 3)] and "--text-key" in where[("good.jsonl", 3)]
    assert "not a string" in where[("good.jsonl", 4)]
    assert where[("empty.txt", None)] == "empty file"
    assert "binary" in where[("blob.txt", None)] and "UTF-8" in where[("latin.txt", None)]
    assert "binary" in where[("late.txt", None)] and "not valid JSON" in where[("nul.jsonl", 2)]


def test_records_suffixes_hidden_entries_and_permissions(tmp_path):
    # a JSON string may hold U+2028/U+2029/U+0085 raw: a record ends at "\n" only; .JSONL is JSON lines too; an
    # interrupted prepare's .prepare-* directory (and any hidden entry) in an input directory is not input; the
    # dataset is readable as the umask says, not mkdtemp's 0700
    inputs = tmp_path / "in"
    inputs.mkdir()
    texts = ["line\u2028separator", "paragraph\u2029separator", "next\u0085line", "plain"]
    (inputs / "a.jsonl").write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts),
                                    encoding="utf-8")
    (inputs / "B.JSONL").write_text(json.dumps({"text": "upper"}) + "\n")
    (inputs / ".prepare-x1y2").mkdir()
    (inputs / ".prepare-x1y2" / "tokens.bin").write_bytes(b"\x00" * 64)
    (inputs / ".notes.txt").write_text("hidden")
    old = os.umask(0o022)
    try:
        summary = prepare(str(inputs), str(tmp_path / "ds"), workers=1, progress=False)
    finally:
        os.umask(old)
    assert summary["skipped"] == 0 and summary["files"] == 2 and summary["documents"] == 5, summary["problems"]
    assert summary["tokens"] == sum(len(t.encode()) + 1 for t in [*texts, "upper"])
    assert os.stat(tmp_path / "ds").st_mode & 0o777 == 0o755
    # the working directory a killed prepare left beside its output is removed by the next one on this host (of
    # a process no longer running), not another host's
    import subprocess

    from longctx.data import prepare as prepare_module

    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid names no running process now
    mine = tmp_path / f".prepare-{prepare_module._HOST}-{dead.pid}-abc123"
    theirs = tmp_path / f".prepare-otherhost-{dead.pid}-abc123"
    for left in (mine, theirs):
        left.mkdir()
        (left / "tokens.bin").write_bytes(b"\x00" * 64)
    prepare(str(inputs), str(tmp_path / "ds"), workers=1, progress=False)
    assert not mine.exists() and theirs.exists()


def test_strict_rejects_and_leaves_the_previous_dataset_intact(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_text(json.dumps({"text": "one"}) + "\n")
    out = tmp_path / "ds"
    first = prepare(str(tmp_path / "in"), str(out), progress=False)
    (tmp_path / "in" / "b.jsonl").write_text("{broken\n")
    with pytest.raises(PrepareError, match=r"b.jsonl:1: not valid JSON.*--strict: nothing written"):
        prepare(str(tmp_path / "in"), str(out), strict=True, progress=False)
    assert json.loads((out / "meta.json").read_text())["tokens"] == first["tokens"]
    again = prepare(str(tmp_path / "in"), str(out), progress=False)  # re-run over the same output
    assert again["tokens"] == first["tokens"] and again["skipped"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ds", "in"]  # no temporary directory left behind


def test_bad_arguments_name_the_fix(tmp_path, capsys):
    with pytest.raises(PrepareError, match="matches no file"):
        prepare(str(tmp_path / "nothing*.jsonl"), str(tmp_path / "ds"), progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    (tmp_path / "x.txt").write_text("text")
    with pytest.raises(PrepareError, match=r"not a prepared dataset \(one holds tokens.bin, offsets.npy, meta.json "
                                           r"and nothing else\); refusing"):
        prepare(str(tmp_path / "x.txt"), str(tmp_path / "mine"), progress=False)
    (tmp_path / "mine" / "meta.json").write_text("{}")  # a project's own meta.json does not make it a dataset
    with pytest.raises(PrepareError, match="not a prepared dataset"):
        prepare(str(tmp_path / "x.txt"), str(tmp_path / "mine"), progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "mount").mkdir()
    real_ismount = os.path.ismount
    try:
        os.path.ismount = lambda p: os.path.basename(p) == "mount" or real_ismount(p)
        with pytest.raises(PrepareError, match=r"--output .*mount' is a mount point.* e.g. --output .*mount/ds"):
            prepare(str(tmp_path / "x.txt"), str(tmp_path / "mount"), progress=False)
    finally:
        os.path.ismount = real_ismount
    with pytest.raises(ValueError, match="no tokenizer.json there"):
        prepare(str(tmp_path / "x.txt"), str(tmp_path / "ds"), tokenizer=str(tmp_path / "nope"), progress=False)
    with pytest.raises(PrepareError, match="--output is empty; give the directory"):
        prepare(str(tmp_path / "x.txt"), "", progress=False)
    with pytest.raises(PrepareError, match=r"--output .*x.txt/sub'.*x.txt is a file, not a directory.*choose"):
        prepare(str(tmp_path / "x.txt"), str(tmp_path / "x.txt" / "sub"), progress=False)
    with pytest.raises(PrepareError, match=r"--text-key 'body' names the text field of JSON lines and Parquet inputs, "
                                           r"and none of the 1 input files is one.*drop --text-key"):
        prepare(str(tmp_path / "x.txt"), str(tmp_path / "ds"), text_key="body", progress=False)
    for argv in (["--output", str(tmp_path / "mine")], ["--output", str(tmp_path / "ds"), "--text-key", "body"]):
        assert main(["data", "prepare", "--input", str(tmp_path / "x.txt"), *argv]) == 2
        assert capsys.readouterr().err.count("\n") == 1
    assert not (tmp_path / "ds").exists()


def test_workers_are_capped_by_files_and_cpus(tmp_path, monkeypatch):
    import longctx.data.prepare as prep

    started = []

    class Pool(prep.ProcessPoolExecutor):
        def __init__(self, max_workers):
            started.append(max_workers)
            super().__init__(max_workers=max_workers)

    monkeypatch.setattr(prep, "ProcessPoolExecutor", Pool)
    (tmp_path / "a.txt").write_text("one")
    (tmp_path / "b.txt").write_text("two")
    summary = prepare(str(tmp_path / "*.txt"), str(tmp_path / "ds"), workers=100000, progress=False)
    assert summary["documents"] == 2 and started == [min(2, os.cpu_count() or 1)]
    with pytest.raises(PrepareError, match="--workers must be >= 1"):
        prepare(str(tmp_path / "*.txt"), str(tmp_path / "ds"), workers=0, progress=False)


def test_cli_prepares_and_reports(tmp_path, capsys):
    _corpus(tmp_path, n_docs=40)
    assert main(["data", "prepare", "--input", str(tmp_path / "*.jsonl"), "--output", str(tmp_path / "ds"),
                 "--workers", "2", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "40 documents" in out and "document lengths (tokens)" in out


def test_parquet_input(tmp_path):
    pa = pytest.importorskip("pyarrow", reason="Parquet input needs pyarrow (extra: data)")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["first doc", "second"], "n": [1, 2]}), tmp_path / "t.parquet")
    summary = prepare(str(tmp_path / "t.parquet"), str(tmp_path / "ds"), text_key="body", progress=False)
    assert summary["documents"] == 2 and summary["tokens"] == len("first doc") + len("second") + 2
    with pytest.raises(PrepareError, match=r"no document could be read from the input; the first problem: "
                                           r".*t.parquet: .*'text'.*; nothing written"):
        prepare(str(tmp_path / "t.parquet"), str(tmp_path / "ds2"), progress=False)
    os.mkdir(tmp_path / "nothing")
    with pytest.raises(PrepareError, match="--input names no file"):
        prepare(str(tmp_path / "nothing"), str(tmp_path / "ds3"), progress=False)


def test_tokenizer_json_from_a_local_file(tmp_path):
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs `tokenizers` (extra: hf)")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "hello": 2, "world": 3, "long": 4}
    tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello long world"}) + "\n" +
                                      json.dumps({"text": "world unknown"}) + "\n")
    summary = prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "ds"), tokenizer=str(tmp_path), progress=False)
    assert summary["vocab_size"] == 5 and summary["eos_id"] == 1
    tokens = np.memmap(tmp_path / "ds" / "tokens.bin", dtype=summary["dtype"], mode="r").tolist()
    assert tokens == [2, 4, 3, 1, 3, 0, 1]
    src = TokenSource(str(tmp_path / "ds"), seq_len=3, seed=0, vocab_size=8, shuffle=False)
    assert src.sequence(0)[0].tolist() == [2, 4, 3]
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text('{"foo": 1}')
    for spec in (tmp_path / "bad", tmp_path / "bad" / "tokenizer.json"):  # a directory holding one, or the file
        with pytest.raises(ValueError, match=r"--tokenizer .*bad.*is not a valid Hugging Face tokenizer.json \(.+\)"):
            prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "ds2"), tokenizer=str(spec), progress=False)
    assert not (tmp_path / "ds2").exists()


def test_a_tokenizer_json_without_the_tokenizers_package_is_one_line(tmp_path, monkeypatch, capsys):
    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hello"}) + "\n")
    monkeypatch.setitem(__import__("sys").modules, "tokenizers", None)  # as on an install without the hf extra
    assert main(["data", "prepare", "--input", str(tmp_path / "d.jsonl"), "--output", str(tmp_path / "ds"),
                 "--tokenizer", str(tmp_path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("longctx: error: tokenizers is needed for a tokenizer.json but is not installed") and \
        err.strip().endswith("install it with: pip install 'longctx[hf]'") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "ds").exists()


def test_a_tokenizer_saved_with_truncation_or_padding_still_takes_whole_documents(tmp_path):
    """A tokenizer.json saved with truncation (a model's max_length) or padding on: every document is still
    tokenized whole, with nothing added (it was cut to 3 tokens, or filled with <pad>); a document the tokenizer
    cannot encode at all (a WordLevel without an unknown token) is skipped by name, not a traceback."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs `tokenizers` (extra: hf)")
    from tokenizers import models, pre_tokenizers

    vocab = {"[UNK]": 0, "</s>": 1, "<pad>": 2, "a": 3, "b": 4}
    docs = ["a b a b a", "b", "a a"]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    for name, setting in (("cut", lambda t: t.enable_truncation(max_length=3)),
                          ("padded", lambda t: t.enable_padding(length=8, pad_id=2, pad_token="<pad>"))):
        tok = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        setting(tok)
        tok.save(str(tmp_path / f"{name}.json"))
        summary = prepare(str(tmp_path / "d.jsonl"), str(tmp_path / name), tokenizer=str(tmp_path / f"{name}.json"),
                          progress=False)
        tokens = np.fromfile(tmp_path / name / "tokens.bin", dtype=summary["dtype"]).tolist()
        assert tokens == [3, 4, 3, 4, 3, 1, 4, 1, 3, 3, 1], (name, tokens)
    no_unknown = tokenizers.Tokenizer(models.WordLevel({"a": 0, "</s>": 1}))
    no_unknown.pre_tokenizer = pre_tokenizers.Whitespace()
    no_unknown.save(str(tmp_path / "strict.json"))
    summary = prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "ds"), tokenizer=str(tmp_path / "strict.json"),
                      progress=False)
    assert summary["documents"] == 1 and np.fromfile(tmp_path / "ds" / "tokens.bin", dtype=np.uint16).tolist() == \
        [0, 0, 1]
    assert [(p["line"], p["reason"].split(" (")[0]) for p in summary["problems"]] == \
        [(1, "the tokenizer cannot encode it"), (2, "the tokenizer cannot encode it")], summary["problems"]


def test_odd_inputs_are_skipped_by_name_and_every_file_is_read_once(tmp_path):
    """A lone surrogate (JSON's "\\ud83d"), a broken link, a non-object record and null Parquet cells are skipped
    with their reason (grouped by reason, not by row); a linked directory is read as a glob would read it, a link
    loop ends; a file named twice (a path, a link, an absolute path) is read once; an existing name with brackets
    is that file, not a glob."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    corpus = tmp_path / "corpus"
    (corpus / "real").mkdir(parents=True)
    (tmp_path / "shard").mkdir()
    (corpus / "real" / "a.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud83d end"}\n[1, 2]\n')
    (tmp_path / "shard" / "b.txt").write_text("linked")
    os.symlink(tmp_path / "shard", corpus / "linked")
    os.symlink(corpus, corpus / "real" / "loop")
    os.symlink(tmp_path / "gone.txt", corpus / "broken.txt")
    pq.write_table(pa.table({"text": ["p1", None, None, "p2"]}), corpus / "c.parquet")
    summary = prepare([str(corpus), str(corpus / "real" / "a.jsonl"), str(tmp_path / "shard" / "b.txt")],
                      str(tmp_path / "ds"), progress=False)
    where = {(os.path.basename(p["file"]), p["line"]): p["reason"] for p in summary["problems"]}
    assert summary["files"] == 4 and summary["documents"] == 4, summary  # ok, linked, p1, p2
    assert where[("a.jsonl", 2)] == "unpaired surrogate (U+D83D at character 4)"
    assert where[("a.jsonl", 3)].startswith("not a JSON object (a list)") and "--text-key" not in where[("a.jsonl", 3)]
    assert where[("broken.txt", None)].startswith("cannot be read (")
    assert where[("c.parquet", 2)] == where[("c.parquet", 3)] == "'text' is not a string"
    assert summary["skipped_by_reason"] == {"unpaired surrogate": 1, "not a JSON object": 1, "cannot be read": 1,
                                            "'text' is not a string": 2}
    (tmp_path / "part[1].txt").write_text("bracketed")
    (tmp_path / "part1.txt").write_text("the glob's match")
    single = prepare(str(tmp_path / "part[1].txt"), str(tmp_path / "one"), progress=False)
    assert single["tokens"] == len("bracketed") + 1
    # a UTF-8 byte-order mark (Windows editors) is no part of the text: the first record parses, no 239 187 191
    (tmp_path / "bom.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "first"}\r\n{"text": "second"}\r\n')
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    bom = prepare([str(tmp_path / "bom.jsonl"), str(tmp_path / "bom.txt")], str(tmp_path / "bom"), progress=False)
    assert bom["documents"] == 3 and not bom["problems"], bom
    tokens = np.fromfile(tmp_path / "bom" / "tokens.bin", dtype=np.uint16)
    assert bytes(int(t) for t in tokens if t < 256) == b"firstsecondhello"


def test_a_dataset_behind_a_link_is_replaced_in_one_step(tmp_path):
    """--output a link to a dataset replaces the dataset (the link stays a link); the swap leaves nothing beside
    it, and where the system exchanges directories atomically the exchange is exact."""
    from longctx._paths import exchange

    (tmp_path / "a.txt").write_text("first")
    prepare(str(tmp_path / "a.txt"), str(tmp_path / "data" / "ds"), progress=False)
    (tmp_path / "links").mkdir()
    os.symlink(tmp_path / "data" / "ds", tmp_path / "links" / "ds")
    (tmp_path / "a.txt").write_text("second, longer")
    summary = prepare(str(tmp_path / "a.txt"), str(tmp_path / "links" / "ds"), progress=False)
    assert os.path.islink(tmp_path / "links" / "ds") and sorted(os.listdir(tmp_path / "links")) == ["ds"]
    assert sorted(os.listdir(tmp_path / "data")) == ["ds"]
    assert json.loads((tmp_path / "data" / "ds" / "meta.json").read_text())["tokens"] == summary["tokens"] == 15
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    (tmp_path / "x" / "in_x").write_text("")
    if exchange(str(tmp_path / "x"), str(tmp_path / "y")):
        assert os.listdir(tmp_path / "y") == ["in_x"] and os.listdir(tmp_path / "x") == []


def test_a_vocabulary_with_gaps_sizes_ids_not_entries_and_empty_tokenizations_are_reported(tmp_path):
    """A tokenizer.json whose ids skip (0, 1, 70000): vocab_size is the largest id + 1 and the file uint32, so
    id 70000 is stored as itself (a count of 3 entries chose uint16 and wrapped it to 4464). A document the
    tokenizer reduces to nothing is skipped by name; a tokenizer with no end-of-document token is said."""
    tokenizers = pytest.importorskip("tokenizers", reason="tokenizer.json needs `tokenizers` (extra: hf)")
    from tokenizers import models, pre_tokenizers

    tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1, "b": 70000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "d.jsonl").write_text('{"text": "a b"}\n{"text": "   "}\n{"text": "b b a"}\n')
    summary = prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "ds"), tokenizer=str(tmp_path / "tok.json"),
                      progress=False)
    assert summary["vocab_size"] == 70001 and summary["dtype"] == "uint32"
    assert np.fromfile(tmp_path / "ds" / "tokens.bin", dtype=np.uint32).tolist() == [0, 70000, 70000, 70000, 0]
    assert [(p["line"], p["reason"]) for p in summary["problems"]] == [(2, "empty after tokenization")]
    from longctx.data.prepare import format_summary

    assert "note: the tokenizer has none of </s>" in format_summary(summary, "ds")
    assert "note:" not in format_summary(prepare(str(tmp_path / "d.jsonl"), str(tmp_path / "ds2"),
                                                 progress=False), "ds2")  # the byte tokenizer has one


def test_json_lines_are_read_a_record_at_a_time_and_a_bad_line_costs_only_itself(tmp_path, monkeypatch):
    """One line that is not UTF-8 skips that line (with its byte offset in the file), not the file; a glob that
    matches a broken link reads the rest and reports the link; each worker loads the tokenizer once, not per
    file; at most 2 x workers files are in flight (map would submit them all)."""
    import longctx.data.prepare as prep

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b'{"text": "one"}\n{"text": "t\xffo"}\n{"text": "three"}\n')
    os.symlink(tmp_path / "gone", tmp_path / "in" / "broken.txt")
    for i in range(6):
        (tmp_path / "in" / f"f{i}.txt").write_text(f"file {i}")
    loads, submitted, in_flight = [], [], []
    real_load = prep.load_tokenizer
    monkeypatch.setattr(prep, "load_tokenizer", lambda spec: loads.append(spec) or real_load(spec))
    prep._tokenizer.cache_clear()

    class InlinePool:  # runs each call when submitted, in this process (so the tokenizer loads are seen)
        def __init__(self, max_workers):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            from concurrent.futures import Future

            submitted.append(args[0])
            in_flight.append(len(submitted) - len(read))
            future = Future()
            future.set_result(fn(*args))
            return future

    read = []
    real_in_order = prep._in_order
    monkeypatch.setattr(prep, "_in_order", lambda *a, **k: (read.append(r) or r for r in real_in_order(*a, **k)))
    monkeypatch.setattr(prep, "ProcessPoolExecutor", InlinePool)
    summary = prepare(str(tmp_path / "in" / "*"), str(tmp_path / "ds"), workers=1, progress=False)
    prep._tokenizer.cache_clear()
    where = {(os.path.basename(p["file"]), p["line"]): p["reason"] for p in summary["problems"]}
    assert where == {("a.jsonl", 2): "not UTF-8 text (byte 27)", ("broken.txt", None): where[("broken.txt", None)]}
    assert where[("broken.txt", None)].startswith("cannot be read (")
    # once up front (a bad tokenizer fails before any worker starts), once in the one worker: not once per file
    assert summary["documents"] == 2 + 6 and loads == ["byte", "byte"], (summary, loads)
    assert len(submitted) == 8 and max(in_flight) <= 2, in_flight

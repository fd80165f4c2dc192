"""Tokenizers: bytes (the default, nothing to download) or a Hugging Face `tokenizers` file on local disk.

`load_tokenizer(spec)`: "byte" -> ByteTokenizer; a path to tokenizer.json (or a directory holding one) ->
HFTokenizer (the `hf` extra). Nothing is fetched from the network, ever: a spec that is neither is an error.
"""

from __future__ import annotations

import os

from .._messages import first_line
from .._optional import require

EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>")  # the end-of-document token, the first found


class ByteTokenizer:
    """UTF-8 bytes are ids 0-255; 256 is end-of-document, 257 padding."""

    name = "byte"
    sha256 = None
    eos_id, pad_id = 256, 257
    vocab_size = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers` tokenizer.json; end-of-document is its eos token when it names one."""

    def __init__(self, path: str, what: str | None = None):
        """`what` names the argument that gave `path` in the errors (default: `--tokenizer PATH`)."""
        what = what or f"--tokenizer {path!r}"
        Tokenizer = require("tokenizers", "a tokenizer.json").Tokenizer
        self.name = os.path.abspath(path)
        self.sha256 = file_sha256(path)
        try:
            self._tok = Tokenizer.from_file(path)
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises a bare Exception for any malformed file
            first = first_line(e)
            raise ValueError(f"{what}: {path} is not a valid Hugging Face tokenizer.json ({first}); give a "
                             "tokenizer.json saved by `tokenizers` / transformers, a directory holding one, "
                             "or 'byte'") from None
        # a tokenizer.json saved with truncation or padding on (a model's max_length, a fixed pad length) would cut
        # every document to that length, or fill it with pad tokens the model then trains on: whole texts only here
        self._tok.no_truncation()
        self._tok.no_padding()
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # ids, not a count: a vocabulary with gaps (ids 0 and 70000) needs 70001 rows and a uint32 file
        self.vocab_size = max([*vocab.values(), self._tok.get_vocab_size(with_added_tokens=True) - 1]) + 1
        eos = next((t for t in EOS_TOKENS if t in vocab), None)
        self.eos_id = vocab[eos] if eos is not None else None
        pad = next((t for t in ("<pad>", "<|pad|>", "[PAD]") if t in vocab), None)
        self.pad_id = vocab[pad] if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids))


def file_sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_tokenizer(spec: str | None = "byte", what: str = "--tokenizer"):
    """`byte`, a tokenizer.json, or a directory holding one (e.g. a Hugging Face checkpoint directory).
    `what` names the argument that gave `spec` in the errors (a missing or malformed tokenizer.json)."""
    if spec in (None, "", "byte"):
        return ByteTokenizer()
    path = os.path.join(spec, "tokenizer.json") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        raise ValueError(f"{what} {spec!r}: not 'byte' and no tokenizer.json there; give 'byte', a local "
                         "tokenizer.json or a directory holding one (nothing is downloaded)")
    return HFTokenizer(path, what=f"{what} {spec!r}")

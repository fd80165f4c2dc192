"""Packed documents: where each document of a packed sequence starts, in natural (unsharded) order.

Packing puts several documents into one training sequence; attention must not cross a boundary and RoPE
restarts at each document. Every rank holds the same `Documents` (a few ints per document, taken from the
full batch before sharding), so each rank can plan, for any (query shard, key shard) pair, exactly the
kernel calls that stay inside one document: the block planner (plan.py) cuts every document's rows and keys
out of the two shards (both are contiguous runs of local indices, since a layout lists positions in
increasing order) and plans the band blocks of that rectangle alone. Blocks no document spans are never
planned: that is the work packing saves, and it is what the counters see.

A value object: hashable, so block tables cached per (layout, rank, src, documents) are computed once per
distinct packing, not once per layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


def _check_starts(starts, seq_len: int, where: str) -> tuple[int, ...]:
    starts = tuple(int(s) for s in starts)
    if not starts or starts[0] != 0:
        raise ValueError(f"{where}: the first document must start at 0, got starts {list(starts[:4])}")
    if any(b <= a for a, b in zip(starts, starts[1:])) or starts[-1] >= seq_len:
        raise ValueError(f"{where}: document starts must increase strictly and stay below seq_len={seq_len}")
    return starts


@dataclass(frozen=True)
class Documents:
    """starts[b]: the positions where documents begin in sequence b (first 0); one row serves a whole batch."""

    seq_len: int
    starts: tuple[tuple[int, ...], ...]

    def __post_init__(self):
        if not self.starts:
            raise ValueError("Documents needs the document starts of at least one sequence")
        object.__setattr__(self, "starts", tuple(_check_starts(s, self.seq_len, f"Documents row {i}")
                                                 for i, s in enumerate(self.starts)))

    @staticmethod
    def from_ids(doc_ids: torch.Tensor) -> Documents:
        """From (batch, seq) document ids: a document is a maximal run of equal ids (an id reused later in
        the sequence is a new document, since attention across the gap would not be causal packing)."""
        if not isinstance(doc_ids, torch.Tensor) or doc_ids.dim() != 2 or doc_ids.dtype.is_floating_point:
            raise ValueError("doc_ids must be an integer tensor of shape (batch, seq)")
        ids = doc_ids.cpu()
        change = torch.ones_like(ids, dtype=torch.bool)
        change[:, 1:] = ids[:, 1:] != ids[:, :-1]
        return Documents(ids.shape[1], tuple(tuple(torch.nonzero(row).flatten().tolist()) for row in change))

    @staticmethod
    def from_lengths(lengths, seq_len: int | None = None) -> Documents:
        """From per-sequence document lengths [[l0, l1, ...], ...]; each row must sum to seq_len."""
        rows = [list(map(int, r)) for r in lengths]
        total = seq_len if seq_len is not None else sum(rows[0])
        for i, r in enumerate(rows):
            if any(x < 1 for x in r) or sum(r) != total:
                raise ValueError(f"document lengths of row {i} must be positive and sum to {total}, got {r[:6]}...")
        starts = tuple(tuple(int(sum(r[:j])) for j in range(len(r))) for r in rows)
        return Documents(total, starts)

    @property
    def batch(self) -> int:
        return len(self.starts)

    def rows(self, start: int, stop: int) -> Documents:
        """The documents of sequences start..stop-1 (a microbatch of the batch)."""
        return Documents(self.seq_len, self.starts[start:stop])

    def lengths(self, b: int = 0) -> list[int]:
        s = self.starts[b]
        return [e - a for a, e in zip(s, s[1:] + (self.seq_len,))]

    def groups(self, batch: int) -> list[tuple[slice, tuple[int, ...]]]:
        """(batch rows, starts) for runs of consecutive sequences packed alike: one set of kernel calls each."""
        if self.batch == 1:
            return [(slice(0, batch), self.starts[0])]
        if self.batch != batch:
            raise ValueError(f"documents describe {self.batch} sequences but the batch has {batch}; pass one "
                             "row of starts per sequence (or one row for the whole batch)")
        out, a = [], 0
        for b in range(1, batch + 1):
            if b == batch or self.starts[b] != self.starts[a]:
                out.append((slice(a, b), self.starts[a]))
                a = b
        return out

    @cached_property
    def _start_tensor(self) -> list[torch.Tensor]:
        return [torch.tensor(s) for s in self.starts]

    @cached_property
    def _segments(self) -> torch.Tensor:
        ar = torch.arange(self.seq_len)
        return torch.stack([torch.searchsorted(s, ar, right=True) - 1 for s in self._start_tensor])

    def segment_ids(self) -> torch.Tensor:
        """(rows, seq) document index of every position (what a kernel's document mask takes)."""
        return self._segments

    def rope_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Position inside its document of each global position (c,) -> (rows, c): RoPE restarts per document."""
        pos = positions.cpu()
        out = [pos - s[torch.searchsorted(s, pos, right=True) - 1] for s in self._start_tensor]
        return torch.stack(out).to(positions.device)

    def chunked(self, chunk: int) -> Documents:
        """These documents cut again every `chunk` tokens from each one's start: chunked attention (Llama 4),
        where a token sees only the keys of its own chunk, counted inside its document as RoPE counts."""
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"chunk must be a positive int (tokens per attention chunk), got {chunk!r}")
        rows = tuple(tuple(start for a, n in zip(self.starts[b], self.lengths(b)) for start in range(a, a + n, chunk))
                     for b in range(self.batch))
        return Documents(self.seq_len, rows)

    def check_seq_len(self, n: int) -> None:
        if n != self.seq_len:
            raise ValueError(f"documents describe {self.seq_len}-token sequences but the sequence has {n} tokens")

    def __repr__(self) -> str:
        counts = [len(s) for s in self.starts]
        return f"Documents(seq_len={self.seq_len}, rows={self.batch}, docs per row={counts[:4]})"

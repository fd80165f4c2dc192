"""Structural attention masks.

A mask says which (query i, key j) pairs of one block may interact, without materialising an Sq x Sk
tensor unless a backend needs one. Every mask kind in longctx is one band around a shifted diagonal,
optionally intersected with document boundaries:

    d = j - (i + offset)          allowed iff  -left <= d <= right   and   q_doc[i] == k_doc[j]

`left`/`right` of None mean unbounded on that side. With this one rule:
  - none:            left=None, right=None
  - causal:          right=0                (offset None = bottom-right alignment, offset = Sk - Sq)
  - striped shifted: right=-1               (diagonal excluded, docs/algorithms.md §1)
  - sliding window:  left=w-1, right=0      (causal window of w keys, diagonal included)
  - documents:       q_doc/k_doc int tensors of shape (batch, Sq) / (batch, Sk)

Schedules cut blocks into sub-blocks; `sub(q0, q1, k0, k1)` re-expresses the same global rule on a
sub-block by moving the diagonal, so no schedule has to reason about masks index by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_INT = (int,)


def _check_int(name: str, value, allow_none: bool = True):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, _INT):
        raise TypeError(f"Mask.{name} must be an int or None, got {type(value).__name__}; pass e.g. {name}=0")


@dataclass(frozen=True, eq=False)
class Mask:
    left: int | None = None
    right: int | None = None
    offset: int | None = None
    q_doc: torch.Tensor | None = None
    k_doc: torch.Tensor | None = None

    def __post_init__(self):
        _check_int("left", self.left)
        _check_int("right", self.right)
        _check_int("offset", self.offset)
        if self.left is not None and self.left < 0 and self.right is None:
            raise ValueError(f"Mask.left={self.left} must be >= 0 (it counts keys before the diagonal)")
        if (self.q_doc is None) != (self.k_doc is None):
            raise ValueError("Mask needs both q_doc and k_doc (document ids of queries and keys), or neither")
        for name in ("q_doc", "k_doc"):
            t = getattr(self, name)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"Mask.{name} must be an integer tensor of shape (batch, seq)")
            if t.dtype.is_floating_point or t.dtype == torch.bool:
                raise TypeError(f"Mask.{name} must hold integer document ids, got {t.dtype}; use .long()")

    # ------------------------------------------------------------------ constructors
    @staticmethod
    def none() -> Mask:
        return Mask()

    @staticmethod
    def causal(offset: int | None = None) -> Mask:
        """Lower triangle incl. the diagonal; offset None aligns bottom-right like flash-attn."""
        return Mask(right=0, offset=offset)

    @staticmethod
    def shifted_causal(offset: int | None = None) -> Mask:
        """Striped attention's rule for KV from a higher rank: the diagonal itself is excluded."""
        return Mask(right=-1, offset=offset)

    @staticmethod
    def sliding_window(window: int, causal: bool = True, offset: int | None = None) -> Mask:
        """Each query sees the `window` keys ending at its diagonal (causal) or within window-1 either side."""
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int (number of keys each query sees), got {window!r}")
        return Mask(left=window - 1, right=0 if causal else window - 1, offset=offset)

    @staticmethod
    def documents(q_doc: torch.Tensor, k_doc: torch.Tensor | None = None, causal: bool = False) -> Mask:
        """Packed sequences: a query sees only keys of its own document (and, if causal, not the future)."""
        return Mask(right=0 if causal else None, q_doc=q_doc, k_doc=q_doc if k_doc is None else k_doc)

    @staticmethod
    def from_flags(causal: bool, window: int | None = None) -> Mask:
        """The mask a whole-sequence attention call means by (causal, window): what every schedule computes."""
        if window is not None:
            return Mask.sliding_window(window, causal=causal)
        return Mask.causal() if causal else Mask.none()

    def with_documents(self, q_doc: torch.Tensor, k_doc: torch.Tensor | None = None) -> Mask:
        return Mask(self.left, self.right, self.offset, q_doc, q_doc if k_doc is None else k_doc)

    # ------------------------------------------------------------------ queries
    @property
    def kind(self) -> str:
        parts = []
        if self.left is None and self.right is None:
            parts.append("none")
        elif self.left is None and self.right == 0:
            parts.append("causal")
        elif self.left is None and self.right == -1:
            parts.append("shifted_causal")
        elif self.left is None:
            parts.append(f"causal(right={self.right})")
        else:
            parts.append(f"window(left={self.left},right={self.right})")
        if self.offset is not None:
            parts[-1] += f"@{self.offset:+d}"
        if self.q_doc is not None:
            parts.append("documents")
        return "+".join(parts)

    @property
    def has_documents(self) -> bool:
        return self.q_doc is not None

    def diag(self, sq: int, sk: int) -> int:
        """The resolved diagonal offset: query i is aligned with key i + diag."""
        return sk - sq if self.offset is None else self.offset

    def sub(self, q0: int, q1: int, k0: int, k1: int, sq: int, sk: int) -> Mask:
        """The same rule restricted to queries [q0, q1) and keys [k0, k1) of an (sq, sk) block."""
        off = self.diag(sq, sk) + q0 - k0
        qd = None if self.q_doc is None else self.q_doc[:, q0:q1]
        kd = None if self.k_doc is None else self.k_doc[:, k0:k1]
        return Mask(self.left, self.right, off, qd, kd)

    def key_range(self, i: int, sq: int, sk: int) -> tuple[int, int]:
        """Half-open range of keys the band allows for query row i (documents ignored)."""
        off = self.diag(sq, sk)
        lo = 0 if self.left is None else max(0, i + off - self.left)
        hi = sk if self.right is None else min(sk, i + off + self.right + 1)
        return lo, max(lo, hi)

    def band_pairs(self, sq: int, sk: int) -> int:
        """Number of allowed pairs of the band (documents ignored), in closed form per row."""
        if sq == 0 or sk == 0:
            return 0
        rows = torch.arange(sq)
        off = self.diag(sq, sk)
        lo = torch.zeros(sq, dtype=torch.long) if self.left is None else (rows + off - self.left).clamp(0, sk)
        hi = torch.full((sq,), sk) if self.right is None else (rows + off + self.right + 1).clamp(0, sk)
        return int((hi - lo).clamp(min=0).sum())

    def is_empty(self, sq: int, sk: int) -> bool:
        """True when the band allows no pair at all, so a schedule can skip the block."""
        return self.band_pairs(sq, sk) == 0

    def is_full(self, sq: int, sk: int) -> bool:
        """True when every pair is allowed (no masking needed at all)."""
        if self.q_doc is not None:
            return False
        return self.band_pairs(sq, sk) == sq * sk

    def dense(self, sq: int, sk: int, device=None) -> torch.Tensor:
        """Boolean allowed-matrix of shape (B or 1, sq, sk)."""
        off = self.diag(sq, sk)
        d = torch.arange(sk, device=device)[None, :] - torch.arange(sq, device=device)[:, None] - off
        ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
        if self.left is not None:
            ok &= d >= -self.left
        if self.right is not None:
            ok &= d <= self.right
        ok = ok[None]
        if self.q_doc is not None:
            qd = self.q_doc.to(device)
            kd = self.k_doc.to(device)
            ok = ok & (qd[:, :, None] == kd[:, None, :])
        return ok

    def count_pairs(self, sq: int, sk: int, batch: int = 1) -> int:
        """Allowed (query, key) pairs summed over the batch: the unit of work accounting."""
        if self.q_doc is None:
            return batch * self.band_pairs(sq, sk)
        return int(self.dense(sq, sk).expand(batch, sq, sk).sum())

    def validate_for(self, batch: int, sq: int, sk: int, device) -> None:
        if self.q_doc is None:
            return
        if tuple(self.q_doc.shape) not in ((batch, sq), (1, sq)):
            raise ValueError(
                f"mask.q_doc has shape {tuple(self.q_doc.shape)} but q needs ({batch}, {sq}): one document id "
                "per query token"
            )
        if tuple(self.k_doc.shape) not in ((batch, sk), (1, sk)):
            raise ValueError(
                f"mask.k_doc has shape {tuple(self.k_doc.shape)} but k needs ({batch}, {sk}): one document id "
                "per key token"
            )
        if self.q_doc.device != torch.device(device) or self.k_doc.device != torch.device(device):
            raise ValueError(f"mask document ids must be on {device} like q; move them with .to(q.device)")

    def __repr__(self) -> str:
        return f"Mask({self.kind})"


NO_MASK = Mask()
CAUSAL = Mask.causal()

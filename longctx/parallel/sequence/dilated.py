"""LongNet dilated attention, single-device and distributed over a contiguous split (docs/algorithms.md §10).

One pattern (w, r): cut the sequence into segments of w tokens, keep every r-th row of each segment, head j
starting at offset j mod r (the paper's per-head offsets, not torchscale's contiguous head groups), and
attend densely inside each sparsified segment. Patterns mix through their softmax denominators, i.e. the
exact LSE merge: the result is one softmax over the multiset union of every pattern's keys of a row.

Heads are handled one residue class at a time: the heads j with j mod r == o all select rows o, o+r, ...,
so `x[:, o::r, o::r]` (rows, heads) is one strided view and every kernel call stays dense. A row takes part
in a pattern only through that view: coverage is structural, there is no `lse == 0` sentinel (§10), and
rows no pattern covers stay out = 0, lse = -inf.

GQA: query head j reads kv head j // (H / H_kv) with query head j's offset. Per class only the distinct kv
heads it needs are packed and (for gathered patterns) sent; when the kernel's own GQA mapping cannot read
that short list (e.g. H=6, H_kv=2, r=2: class 0 wants kv heads [0, 0, 1]) it is expanded locally to one
entry per query head, after the collective, so no configuration is refused and no copy goes on the wire;
dK/dV of the copies are summed back with index_add.

Segments longer than the sequence are cut to it (w = min(w, N), as the paper and torchscale do).
Distributed: each rank holds l = N / W contiguous tokens. Patterns with w <= l run locally; patterns with
w > l all-gather the sparsified K/V inside the segment's g = w / l ranks only (a sub-group per segment)
and reduce-scatter dK/dV there in backward (dilated_dist.py).

Backward is exact (§10): only q, k, v, the global out and the global lse (and the small gathered sparse
K/V) are kept; every pattern's blocks are differentiated with the global out/lse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ... import kernels
from .dilated_dist import LOCAL, context_comm, gather_sparse, reduce_scatter_sparse, segment_comm

__all__ = ["LOCAL", "DilatedAttention", "check_pattern", "dilated_attention", "dilated_comm_model",
           "dilated_config", "sparse_kv_heads"]


# ------------------------------------------------------------------------------------------ validation
def _int_list(name: str, xs) -> list[int]:
    if isinstance(xs, int) and not isinstance(xs, bool):
        xs = [xs]
    try:
        xs = list(xs)
    except TypeError:
        raise ValueError(f"{name} must be a list of positive ints, got {xs!r}") from None
    if not xs or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in xs):
        raise ValueError(f"{name} must be a non-empty list of positive ints, got {xs!r}")
    return xs


def _fitting_length(ws, rs, seq_len: int, world: int) -> str:
    """The shortest length past `seq_len` that every check passes, as "N tokens" (a suggestion to pad to: the
    first check's own multiple can fail the next one), or a description when none is near."""
    for n in range(seq_len + (-seq_len) % world or world, seq_len + 4096 * world, world):
        if n <= seq_len:
            continue
        try:
            check_pattern(ws, rs, n, world, suggest=False)
        except ValueError:
            continue
        return f"{n} tokens"
    return "a multiple of every segment length and of the world size"


def check_pattern(segment_lengths, dilation_rates, seq_len: int, world: int = 1, suggest: bool = True) -> list[tuple]:
    """Validate a dilated pattern for a global length and a world size; returns (w, r, g) per pattern with
    w cut to seq_len and g = ranks per segment (1: the pattern runs locally). Errors name the fix (a padded
    length that passes every check; `suggest=False`: the search's own calls)."""
    ws = _int_list("segment_lengths", segment_lengths)
    rs = _int_list("dilation_rates", dilation_rates)
    if len(ws) != len(rs):
        raise ValueError(f"segment_lengths has {len(ws)} entries but dilation_rates has {len(rs)}; give one "
                         "dilation rate per segment length")
    for a, b in zip(ws, ws[1:]):
        if b % a:
            raise ValueError(f"segment_lengths must be geometric (each a multiple of the previous, e.g. "
                             f"2048,4096,8192), got {ws}: {b} is not a multiple of {a}")
    def fit() -> str:
        return _fitting_length(ws, rs, seq_len, world) if suggest else ""

    if seq_len % world:
        raise ValueError(f"sequence length {seq_len} is not divisible by the world size {world}; pad it to {fit()}")
    l = seq_len // world
    out = []
    for i, (w0, r) in enumerate(zip(ws, rs)):
        w = min(w0, seq_len)
        cut = f" (segment_lengths[{i}]={w0} cut to the sequence length)" if w != w0 else ""
        if seq_len % w:
            raise ValueError(f"segment_lengths[{i}]={w} does not divide the sequence length {seq_len}; pad "
                             f"the sequence to {fit()} or pick segment lengths dividing it")
        if w % r:
            raise ValueError(f"dilation_rates[{i}]={r} does not divide segment length {w}{cut}; use a rate "
                             f"that divides it (e.g. a power of two for power-of-two segments)")
        if w <= l:
            if l % w:
                raise ValueError(f"local length {l} (= {seq_len} tokens / {world} ranks) is not a multiple "
                                 f"of segment_lengths[{i}]={w}: a segment would straddle two ranks; choose a "
                                 f"world size W with {seq_len}/W a multiple of {w}")
            out.append((w, r, 1))
            continue
        if w % l:
            raise ValueError(f"segment_lengths[{i}]={w} is not a multiple of the local length {l} (= "
                             f"{seq_len} tokens / {world} ranks): a segment must span whole ranks; choose a "
                             f"world size with {w} a multiple of {seq_len}/W")
        if l % r:
            raise ValueError(f"local length {l} is not a multiple of dilation_rates[{i}]={r}: ranks would "
                             f"not keep the global row residues; choose a world size with {seq_len}/W a "
                             f"multiple of {r}")
        out.append((w, r, w // l))
    return out


# ------------------------------------------------------------------------------------------ head classes
@dataclass(frozen=True)
class _Class:
    o: int             # row offset = residue of the heads o, o+r, o+2r, ...
    kv: tuple          # the distinct kv heads these query heads read: what is packed and gathered
    h0: int            # where this class's kv heads start in the packed sparse K/V of a pattern
    idx: torch.Tensor  # kv as a tensor, for index_select / index_add
    # per query head, the position of its kv head in kv; None when the kernel's own GQA mapping (query i
    # reads kv[i // rep]) already reads kv as it is
    expand: torch.Tensor | None
    kern: torch.Tensor  # the kv heads handed to the kernel: kv, or kv expanded (local patterns select these)


@lru_cache(maxsize=256)
def _classes(h: int, hkv: int, r: int) -> tuple[_Class, ...]:
    group = h // hkv
    out, h0 = [], 0
    for o in range(min(r, h)):  # residues >= h have no head: those rows are not covered by this pattern
        want = [j // group for j in range(o, h, r)]
        kv = sorted(set(want))
        rep = len(want) // len(kv)
        # want is non-decreasing, so the kernel's mapping is exact iff every kv head serves rep query heads
        direct = len(want) % len(kv) == 0 and all(want[i] == kv[i // rep] for i in range(len(want)))
        expand = None if direct else torch.tensor([kv.index(x) for x in want])
        out.append(_Class(o, tuple(kv), h0, torch.tensor(kv), expand, torch.tensor(kv if direct else want)))
        h0 += len(kv)
    return tuple(out)


def sparse_kv_heads(heads: int, kv_heads: int | None, rate: int) -> int:
    """Heads of the packed sparse K (or V) of one pattern: what a gathered pattern moves per row, one per
    distinct (class, kv head) pair."""
    kv_heads = heads if kv_heads is None else kv_heads
    return sum(len(c.kv) for c in _classes(heads, kv_heads, rate))


# ------------------------------------------------------------------------------------------ plan
@dataclass(frozen=True, eq=False)
class _Pattern:
    w: int
    r: int
    g: int       # ranks per segment; 1 = local
    m: int       # this rank's position in its segment group
    comm: object  # segment sub-group Comm (None when local)


@dataclass(frozen=True, eq=False)
class _Spec:
    patterns: tuple
    causal: bool
    scale: float
    kernel: str

    @property
    def mask(self) -> kernels.Mask:
        return kernels.Mask.from_flags(self.causal)


def _merge_into(acc_o, acc_l, o, l) -> None:
    """Merge a partial (o (B,S,h,D), l (B,h,S)) into strided views of the running state (lse kept (B,S,h)).

    The guarded merge of kernels.merge_many (max shift, -inf/+inf safe), written in place: at a million
    tokens a rate-1 pattern spans the whole state, and merge_many's stacked copies would set the peak."""
    l = l.transpose(1, 2)
    l = torch.where(l == math.inf, torch.full_like(l, -math.inf), l)
    m = torch.maximum(acc_l, l)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    a, b = torch.exp(acc_l - m), torch.exp(l - m)
    s = a + b
    ok = s > 0
    s = torch.where(ok, s, torch.ones_like(s))
    acc_o.mul_((a / s).unsqueeze(-1)).add_(o.mul_((b / s).unsqueeze(-1)))
    acc_l.copy_(torch.where(ok, m + torch.log(s), torch.full_like(s, -math.inf)))


def _segments(x, w):
    """(B, L, ...) -> (B * L / w, w, ...): local segments become batch rows (a view)."""
    return x.view(x.shape[0] * (x.shape[1] // w), w, *x.shape[2:])


def _sparse_kv(k, c: _Class, r: int, heads: torch.Tensor):
    return k[:, c.o::r].index_select(2, heads.to(k.device))


def _gathered_kv(buf, c: _Class):
    """Packed gathered K/V (n, 2, B, L/r, Hs, D) -> this class's (B, n * L/r, h_kv, D) K and V, expanded
    to the kernel's heads after the gather (only distinct heads travel)."""
    n, _, b, lr, _, d = buf.shape
    part = buf[:, :, :, :, c.h0:c.h0 + len(c.kv)]
    kv = part.permute(1, 2, 0, 3, 4, 5).reshape(2, b, n * lr, len(c.kv), d)
    if c.expand is not None:
        kv = kv.index_select(3, c.expand.to(kv.device))
    return kv[0], kv[1]


def _fold(g, c: _Class):
    """Gradient w.r.t. the kernel's kv heads -> w.r.t. the distinct packed heads (copies summed)."""
    if c.expand is None:
        return g
    out = g.new_zeros((*g.shape[:2], len(c.kv), g.shape[3]))
    return out.index_add_(2, c.expand.to(g.device), g)


# ------------------------------------------------------------------------------------------ forward
def _forward(q, k, v, spec: _Spec):
    b, l, h, _ = q.shape
    acc = kernels.acc_dtype(q.dtype)
    out = torch.zeros(b, l, h, v.shape[-1], dtype=acc, device=q.device)
    lse = torch.full((b, l, h), -math.inf, dtype=acc, device=q.device)
    saved = []
    for p in spec.patterns:
        classes = _classes(h, k.shape[2], p.r)
        if p.g == 1:
            qs, ks, vs, os_, ls = (_segments(x, p.w) for x in (q, k, v, out, lse))
            for c in classes:
                o, lc = kernels.forward(qs[:, c.o::p.r, c.o::p.r], _sparse_kv(ks, c, p.r, c.kern),
                                        _sparse_kv(vs, c, p.r, c.kern), scale=spec.scale, mask=spec.mask,
                                        backend=spec.kernel, out_dtype=acc)
                _merge_into(os_[:, c.o::p.r, c.o::p.r], ls[:, c.o::p.r, c.o::p.r], o, lc)
            saved.append(None)
            continue
        # distinct kv heads only: the expansion to one entry per query head happens after the gather
        packed = torch.stack([torch.cat([_sparse_kv(x, c, p.r, c.idx) for c in classes], dim=2) for x in (k, v)])
        # causal: segment rank m needs the keys of segment ranks 0..m only (inclusive, §10)
        buf = gather_sparse(packed, p.comm, keep=p.m + 1 if spec.causal else p.g)
        for c in classes:
            kc, vc = _gathered_kv(buf, c)
            # bottom-right causal alignment: local sparse query i sits at gathered key m * L/r + i
            o, lc = kernels.forward(q[:, c.o::p.r, c.o::p.r], kc, vc, scale=spec.scale,
                                    mask=spec.mask, backend=spec.kernel, out_dtype=acc)
            _merge_into(out[:, c.o::p.r, c.o::p.r], lse[:, c.o::p.r, c.o::p.r], o, lc)
        saved.append(buf)
    return out, lse, saved


# ------------------------------------------------------------------------------------------ backward
def _backward(dout, q, k, v, out, lse, saved, spec: _Spec):
    b, l, h, d = q.shape
    acc = kernels.acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    dk = torch.zeros(k.shape, dtype=acc, device=q.device)
    dv = torch.zeros(v.shape, dtype=acc, device=q.device)
    for p, buf in zip(spec.patterns, saved):
        classes = _classes(h, k.shape[2], p.r)
        if p.g == 1:
            views = [_segments(x, p.w) for x in (q, k, v, out, lse, dout, dq, dk, dv)]
            qs, ks, vs, os_, ls, dos, dqs, dks, dvs = views
        else:
            qs, os_, ls, dos, dqs = q, out, lse, dout, dq
            dbuf = torch.zeros((p.g, *buf.shape[1:]), dtype=acc, device=q.device)
        for c in classes:
            sl = (slice(None), slice(c.o, None, p.r), slice(c.o, None, p.r))
            if p.g == 1:
                kc, vc = _sparse_kv(ks, c, p.r, c.kern), _sparse_kv(vs, c, p.r, c.kern)
            else:
                kc, vc = _gathered_kv(buf, c)
            gq, gk, gv = kernels.backward(dos[sl].contiguous(), qs[sl].contiguous(), kc, vc,
                                          os_[sl].contiguous(), ls[sl].transpose(1, 2).contiguous(),
                                          scale=spec.scale, mask=spec.mask, backend=spec.kernel,
                                          grad_dtype=acc)
            dqs[sl] += gq
            if p.g == 1:
                idx = c.kern.to(q.device)
                dks[:, c.o::p.r].index_add_(2, idx, gk)
                dvs[:, c.o::p.r].index_add_(2, idx, gv)
            else:
                n, lr, hk = buf.shape[0], buf.shape[3], len(c.kv)
                g2 = torch.stack([_fold(gk, c), _fold(gv, c)]).view(2, b, n, lr, hk, d).permute(2, 0, 1, 3, 4, 5)
                dbuf[:n, :, :, :, c.h0:c.h0 + hk] += g2
        if p.g > 1:
            mine = reduce_scatter_sparse(dbuf, p.comm)  # (2, B, L/r, Hs, D): the grads of this rank's rows
            for c in classes:
                idx = c.idx.to(q.device)
                dk[:, c.o::p.r].index_add_(2, idx, mine[0, :, :, c.h0:c.h0 + len(c.kv)])
                dv[:, c.o::p.r].index_add_(2, idx, mine[1, :, :, c.h0:c.h0 + len(c.kv)])
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _DilatedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, spec: _Spec):
        out, lse, saved = _forward(q, k, v, spec)
        out = out.to(q.dtype)
        bufs = [s for s in saved if s is not None]
        ctx.save_for_backward(q, k, v, out, lse, *bufs)
        ctx.spec, ctx.has_buf = spec, [s is not None for s in saved]
        lse_bhs = lse.transpose(1, 2).contiguous()
        ctx.mark_non_differentiable(lse_bhs)
        return out, lse_bhs

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, *bufs = ctx.saved_tensors
        it = iter(bufs)
        saved = [next(it) if has else None for has in ctx.has_buf]
        dq, dk, dv = _backward(dout.contiguous(), q, k, v, out, lse, saved, ctx.spec)
        return dq, dk, dv, None


def dilated_attention(q, k, v, *, segment_lengths, dilation_rates, causal: bool = False, scale=None,
                      kernel: str = "auto", group=None, return_lse: bool = False):
    """LongNet dilated attention on q (B, L, H, D), k, v (B, L, H_kv, D); differentiable, exact backward.

    `group`: the sequence-parallel process group (None = the default group when torch.distributed is
    initialised, else single device; LOCAL = single device inside a distributed job). Distributed, each
    rank passes its contiguous chunk (rank r holds tokens [r*L, (r+1)*L)) and gets its output chunk.
    Returns out in q's dtype, and with return_lse the global lse (B, H, L) (-inf where nothing is covered).
    """
    scale, _ = kernels.validate(q, k, v, scale, None)
    if q.shape[1] != k.shape[1]:
        raise ValueError(f"q has {q.shape[1]} tokens but k/v have {k.shape[1]}; dilated attention is "
                         "self-attention over one sequence (equal lengths)")
    comm = context_comm(group)
    world, rank = (1, 0) if comm is None else (comm.world, comm.rank)
    plan = check_pattern(segment_lengths, dilation_rates, q.shape[1] * world, world)
    if comm is not None and q.device.type != comm.device.type:
        raise ValueError(f"q is on {q.device} but the process group communicates {comm.device.type} tensors; "
                         f"move q, k, v to {comm.device}")
    if v.shape[-1] != k.shape[-1] and any(g > 1 for _, _, g in plan):
        # a gathered pattern stacks K and V in one buffer (and its gradients in one): one width
        raise ValueError(f"v's head width {v.shape[-1]} differs from q/k's {k.shape[-1]}, which dilated attention "
                         "takes only for patterns inside one rank's chunk; these patterns span ranks: use "
                         "segment lengths within a rank's chunk, or v of q's width")
    pats = tuple(_Pattern(w, r, g, rank % g, segment_comm(group, comm, g) if g > 1 else None)
                 for w, r, g in plan)
    spec = _Spec(pats, bool(causal), scale, kernel)
    out, lse = _DilatedFn.apply(q.contiguous(), k.contiguous(), v.contiguous(), spec)
    return (out, lse) if return_lse else out


# ------------------------------------------------------------------------------------------ config, module
def dilated_config(seq_len: int, w0: int = 2048, alpha: int = 2, levels: int | None = None,
                   rate_ratio: int | None = None) -> tuple[list[int], list[int]]:
    """The paper's geometric pattern (Eqs 11-12): w = w0, w0*alpha, ... up to seq_len, r = 1, q, q^2, ...
    with q = rate_ratio (default alpha, so w/r stays w0 and every pattern costs the same). `levels` caps
    the number of patterns. A w0 above seq_len gives the single dense pattern (seq_len, 1)."""
    for name, x in (("seq_len", seq_len), ("w0", w0), ("alpha", alpha)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 1:
            raise ValueError(f"{name} must be a positive int, got {x!r}")
    if alpha < 2:
        raise ValueError(f"alpha must be >= 2 (the growth factor of the segment lengths), got {alpha}")
    q = alpha if rate_ratio is None else rate_ratio
    ws, rs, w, r = [], [], w0, 1
    while True:
        ws.append(min(w, seq_len))
        rs.append(r)
        if w >= seq_len or (levels is not None and len(ws) >= levels):
            break
        w, r = w * alpha, r * q
    check_pattern(ws, rs, seq_len)
    return ws, rs


class DilatedAttention(nn.Module):
    """Holds a dilated pattern and the sequence-parallel group so a model calls `attn(q, k, v)`."""

    def __init__(self, segment_lengths, dilation_rates, *, causal: bool = True, group=None,
                 kernel: str = "auto", scale: float | None = None):
        super().__init__()
        _int_list("segment_lengths", segment_lengths)
        self.segment_lengths, self.dilation_rates = list(segment_lengths), list(dilation_rates)
        check_pattern(self.segment_lengths, self.dilation_rates, max(self.segment_lengths))
        self.causal, self.group, self.kernel, self.scale = causal, group, kernel, scale

    @classmethod
    def geometric(cls, seq_len: int, w0: int = 2048, alpha: int = 2, levels: int | None = None, **kw):
        ws, rs = dilated_config(seq_len, w0, alpha, levels)
        return cls(ws, rs, **kw)

    def forward(self, q, k, v, position_ids=None):
        # a contiguous split is assumed (the positions a model passes are not needed by the pattern)
        return dilated_attention(q, k, v, segment_lengths=self.segment_lengths,
                                 dilation_rates=self.dilation_rates, causal=self.causal, scale=self.scale,
                                 kernel=self.kernel, group=self.group)

    def extra_repr(self) -> str:
        return (f"segment_lengths={self.segment_lengths}, dilation_rates={self.dilation_rates}, "
                f"causal={self.causal}")


# ------------------------------------------------------------------------------------------ byte model
def dilated_comm_model(world: int, batch: int, seq_len: int, heads: int, head_dim: int, dtype_bytes: int,
                       segment_lengths, dilation_rates, kv_heads: int | None = None) -> dict:
    """Bytes and calls one rank sends per layer. Forward: one all-gather of the packed sparse K/V per
    gathered pattern, (g-1) x the local 2*B*(l/r)*Hs*D chunk in the input dtype. Backward: no re-gather
    (the gathered sparse K/V are kept, w/r rows per pattern), one reduce-scatter of the fp32 (fp64 for fp64)
    dK/dV, (g-1) x the same chunk. Causal moves as much: the collectives are whole."""
    acc = 8 if dtype_bytes == 8 else 4
    l = seq_len // world
    res = {"fwd_bytes": 0, "fwd_calls": 0, "bwd_bytes": 0, "bwd_calls": 0}
    for _, r, g in check_pattern(segment_lengths, dilation_rates, seq_len, world):
        if g == 1:
            continue
        chunk = 2 * batch * (l // r) * sparse_kv_heads(heads, kv_heads, r) * head_dim
        res["fwd_bytes"] += (g - 1) * chunk * dtype_bytes
        res["bwd_bytes"] += (g - 1) * chunk * acc
        res["fwd_calls"] += 1
        res["bwd_calls"] += 1
    return res

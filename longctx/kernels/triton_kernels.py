"""FlashAttention-2-style Triton kernels for the local attention contract (see triton_backend.py).

Imported lazily by triton_backend, after TRITON_INTERPRET is decided: `triton.jit` reads it when a
kernel is decorated, so importing this module fixes interpreted vs compiled for the whole process.

Math (docs/algorithms.md §1, §2). Scores live in the log2 domain (s * scale * log2 e) so exp2 is used
throughout; lse is stored in natural log. Masks arrive as one band (off, left, right) plus optional
document ids: key j is allowed for query i iff -left <= j - i - off <= right and q_doc[i] == k_doc[j].
Each program walks only the tiles that intersect its band, in three ranges: partial tiles before the
fully-allowed run, the run itself (no mask arithmetic at all), partial tiles after it.
Values may be narrower or wider than q/k (D_V, BLOCK_DV: latent attention's 192/128), each width in its own
tiles. With SOFTCAP, qk_scale is scale / c and a score becomes c tanh(x) (CAP = c log2 e), dS gaining 1 - tanh^2.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Globals a jit function reads must be constexpr: the compiler refuses plain module floats.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
NEG_2LOG2E = tl.constexpr(-2.8853900817779268)  # exp2(x * this) = exp(-2 x)


@triton.jit
def _plan(a0, a_last, n_other, off, left, right, BLOCK: tl.constexpr):
    """Tile ranges on the other axis for the rows [a0, a_last]: mirrors triton_backend.tile_plan."""
    lo = tl.maximum(a0 + off - left, 0)
    hi = tl.minimum(a_last + off + right + 1, n_other)
    lo_t = (lo // BLOCK) * BLOCK
    # Empty band (hi <= lo, or no key for any row when left + right < 0): run no loop at all.
    hi = tl.where((hi > lo) & (left + right >= 0), hi, lo_t)
    # Triton integer division truncates toward zero: clamp to >= 0 before every division.
    full_lo = tl.maximum(tl.maximum(a_last + off - left, 0), lo_t)
    f0 = tl.maximum(tl.minimum(((full_lo + BLOCK - 1) // BLOCK) * BLOCK, hi), lo_t)
    f1 = tl.maximum((tl.maximum(tl.minimum(a0 + off + right + 1, hi), 0) // BLOCK) * BLOCK, f0)
    return lo_t, f0, f1, hi


@triton.jit
def _tile(base, rows, row_stride, offs_d):
    # Row offsets in int64: seq * heads * head_dim passes 2**31 at long context.
    return base + rows.to(tl.int64)[:, None] * row_stride + offs_d[None, :]


@triton.jit
def _dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # The interpreter multiplies bf16 bit patterns (triton-lang/triton#11584); bf16 products are exact in
    # fp32, so upcasting there gives what the tensor cores give.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def _dot_lowp(x, y, PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr):
    """x (fp32: P or dS) @ y (input dtype). The tensor cores want x rounded to y's dtype, as FlashAttention
    does; SPLIT also multiplies the rounding residual, which gives near-fp32 accuracy for one more dot."""
    hi = x.to(y.dtype)
    out = _dot(hi, y, PREC, UPCAST)
    if SPLIT:
        out += _dot((x - hi.to(tl.float32)).to(y.dtype), y, PREC, UPCAST)
    return out


@triton.jit
def _capped(x, CAP):
    """(c tanh(x) in the log2 domain, 1 - tanh(x)^2) for x = q.k scale / c. tanh from one exp2 of -2|x|,
    which cannot overflow (Triton 3.6 and the interpreter have no tanh of their own in tl)."""
    e = tl.exp2(tl.abs(x) * NEG_2LOG2E)
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(x < 0, -t, t)
    return t * CAP, 1.0 - t * t


@triton.jit
def _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V, s_ks, s_vs,
              OFF, LEFT, RIGHT, qk_scale, CAP,
              MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
              SPLIT: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = (offs_n[:, None] < SK) & (offs_d[None, :] < D)
    k = tl.load(_tile(k_base, offs_n, s_ks, offs_d), mask=k_ok, other=0.0)
    s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
    if SOFTCAP:
        s, _ = _capped(s, CAP)
    if MASKED:
        d = offs_n[None, :] - offs_m[:, None] - OFF
        s = tl.where((d >= -LEFT) & (d <= RIGHT) & (offs_n[None, :] < SK), s, float("-inf"))
    if HAS_DOCS:
        kd = tl.load(kd_base + offs_n, mask=offs_n < SK, other=0)
        s = tl.where(qd[:, None] == kd[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no allowed key keeps max -inf: shift by 0 instead so exp2 gives 0, not NaN.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ok = (offs_n[:, None] < SK) & (offs_dv[None, :] < D_V)
    v = tl.load(_tile(v_base, offs_n, s_vs, offs_dv), mask=v_ok, other=0.0)
    acc = acc * alpha[:, None] + _dot_lowp(p, v, PREC, UPCAST, SPLIT)
    return acc, m_new, l_i


@triton.jit
def fwd_kernel(Q, K, V, O, LSE, QDOC, KDOC, VISITS,
               qk_scale, CAP,
               s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh, s_qdb, s_kdb,
               H, G, SQ, SK, D, D_V, OFF, LEFT, RIGHT, SQ_KEY, SK_KEY,
               HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, COUNT: tl.constexpr,
               PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // G).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_ok = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    q = tl.load(_tile(Q + b * s_qb + h * s_qh, offs_m, s_qs, offs_d), mask=q_ok, other=0.0)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    qd = offs_m
    kd_base = KDOC
    if HAS_DOCS:
        qd = tl.load(QDOC + b * s_qdb + offs_m, mask=offs_m < SQ, other=0)
        kd_base = KDOC + b * s_kdb
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, SQ) - 1
    lo_t, f0, f1, hi = _plan(m0, m_last, SK, OFF, LEFT, RIGHT, BLOCK_N)
    n_part = 0
    n_full = 0
    for n0 in range(lo_t, f0, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V,
                                  s_ks, s_vs, OFF, LEFT, RIGHT, qk_scale, CAP, True, HAS_DOCS, SOFTCAP,
                                  BLOCK_N, BLOCK_D, BLOCK_DV, PREC, UPCAST, SPLIT)
        if COUNT:
            n_part += 1
    for n0 in range(f0, f1, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V,
                                  s_ks, s_vs, OFF, LEFT, RIGHT, qk_scale, CAP, False, HAS_DOCS, SOFTCAP,
                                  BLOCK_N, BLOCK_D, BLOCK_DV, PREC, UPCAST, SPLIT)
        if COUNT:
            n_full += 1
    for n0 in range(f1, hi, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V,
                                  s_ks, s_vs, OFF, LEFT, RIGHT, qk_scale, CAP, True, HAS_DOCS, SOFTCAP,
                                  BLOCK_N, BLOCK_D, BLOCK_DV, PREC, UPCAST, SPLIT)
        if COUNT:
            n_part += 1
    empty = l_i == 0.0  # no allowed key: out = 0, lse = -inf (the merge identity)
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    offs_dv = tl.arange(0, BLOCK_DV)
    tl.store(_tile(O + b * s_ob + h * s_oh, offs_m, s_os, offs_dv),
             out.to(O.dtype.element_ty), mask=(offs_m[:, None] < SQ) & (offs_dv[None, :] < D_V))
    tl.store(LSE + (b * H + h) * SQ + offs_m, lse, mask=offs_m < SQ)
    if COUNT:
        slot = (pid_bh * tl.num_programs(0) + pid_m) * 2
        tl.store(VISITS + slot, n_part)
        tl.store(VISITS + slot + 1, n_full)


@triton.jit
def delta_kernel(O, DO, DELTA, s_ob, s_os, s_oh, s_db, s_ds, s_dh, H, SQ, D,
                 BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    o = tl.load(_tile(O + b * s_ob + h * s_oh, offs_m, s_os, offs_d), mask=ok, other=0.0)
    do = tl.load(_tile(DO + b * s_db + h * s_dh, offs_m, s_ds, offs_d), mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + (b * H + h) * SQ + offs_m, delta, mask=offs_m < SQ)


@triton.jit
def _load_row_stats(LSE, DELTA, row_base, offs_m, SQ):
    # lse = -inf means the row saw no key anywhere (global): +inf makes every P of that row 0.
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < SQ, other=float("inf")).to(tl.float32)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * LOG2E
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < SQ, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, qd_base, kd, LSE, DELTA, row_base, offs_n, m0, SQ, D, D_V,
               s_qs, s_ds, OFF, LEFT, RIGHT, qk_scale, CAP,
               MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
               SPLIT: tl.constexpr):
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ok = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    q = tl.load(_tile(q_base, offs_m, s_qs, offs_d), mask=q_ok, other=0.0)
    do_ok = (offs_m[:, None] < SQ) & (offs_dv[None, :] < D_V)
    do = tl.load(_tile(do_base, offs_m, s_ds, offs_dv), mask=do_ok, other=0.0).to(q.dtype)
    lse, delta = _load_row_stats(LSE, DELTA, row_base, offs_m, SQ)
    # Transposed tile (keys x queries) so dK and dV accumulate without transposing P and dS.
    s_t = _dot(k, tl.trans(q), PREC, UPCAST) * qk_scale
    slope_t = s_t
    if SOFTCAP:
        s_t, slope_t = _capped(s_t, CAP)
    p_t = tl.exp2(s_t - lse[None, :])
    if MASKED:
        d = offs_n[:, None] - offs_m[None, :] - OFF
        p_t = tl.where((d >= -LEFT) & (d <= RIGHT) & (offs_m[None, :] < SQ), p_t, 0.0)
    if HAS_DOCS:
        qd = tl.load(qd_base + offs_m, mask=offs_m < SQ, other=0)
        p_t = tl.where(kd[:, None] == qd[None, :], p_t, 0.0)
    dv += _dot_lowp(p_t, do, PREC, UPCAST, SPLIT)
    dp_t = _dot(v, tl.trans(do), PREC, UPCAST)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:
        ds_t = ds_t * slope_t
    dk += _dot_lowp(ds_t, q, PREC, UPCAST, SPLIT)
    return dk, dv


@triton.jit
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, QDOC, KDOC,
                qk_scale, sm_scale, CAP,
                s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
                s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh, s_qdb, s_kdb,
                H, G, SQ, SK, D, D_V, OFF, LEFT, RIGHT, SQ_KEY, SK_KEY,
                HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
                PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    hkv = H // G
    b = (pid_bk // hkv).to(tl.int64)
    hk = (pid_bk % hkv).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = (offs_n[:, None] < SK) & (offs_d[None, :] < D)
    v_ok = (offs_n[:, None] < SK) & (offs_dv[None, :] < D_V)
    k = tl.load(_tile(K + b * s_kb + hk * s_kh, offs_n, s_ks, offs_d), mask=k_ok, other=0.0)
    v = tl.load(_tile(V + b * s_vb + hk * s_vh, offs_n, s_vs, offs_dv), mask=v_ok, other=0.0)
    kd = offs_n
    qd_base = QDOC
    if HAS_DOCS:
        kd = tl.load(KDOC + b * s_kdb + offs_n, mask=offs_n < SK, other=0)
        qd_base = QDOC + b * s_qdb
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    # Seen from a key, the band is the same rule with (off, left, right) -> (-off, right, left).
    n_last = tl.minimum(n0 + BLOCK_N, SK) - 1
    lo_t, f0, f1, hi = _plan(n0, n_last, SQ, -OFF, RIGHT, LEFT, BLOCK_M)
    # The query heads of a GQA group are summed here, in order: deterministic, no atomics.
    for g in range(0, G):
        h = hk * G + g
        q_base = Q + b * s_qb + h * s_qh
        do_base = DO + b * s_db + h * s_dh
        row_base = (b * H + h) * SQ
        for m0 in range(lo_t, f0, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, qd_base, kd, LSE, DELTA, row_base, offs_n, m0,
                                SQ, D, D_V, s_qs, s_ds, OFF, LEFT, RIGHT, qk_scale, CAP,
                                True, HAS_DOCS, SOFTCAP, BLOCK_M, BLOCK_D, BLOCK_DV, PREC, UPCAST, SPLIT)
        for m0 in range(f0, f1, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, qd_base, kd, LSE, DELTA, row_base, offs_n, m0,
                                SQ, D, D_V, s_qs, s_ds, OFF, LEFT, RIGHT, qk_scale, CAP,
                                False, HAS_DOCS, SOFTCAP, BLOCK_M, BLOCK_D, BLOCK_DV, PREC, UPCAST, SPLIT)
        for m0 in range(f1, hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, qd_base, kd, LSE, DELTA, row_base, offs_n, m0,
                                SQ, D, D_V, s_qs, s_ds, OFF, LEFT, RIGHT, qk_scale, CAP,
                                True, HAS_DOCS, SOFTCAP, BLOCK_M, BLOCK_D, BLOCK_DV, PREC, UPCAST, SPLIT)
    tl.store(_tile(DK + b * s_dkb + hk * s_dkh, offs_n, s_dks, offs_d),
             (dk * sm_scale).to(DK.dtype.element_ty), mask=k_ok)
    tl.store(_tile(DV + b * s_dvb + hk * s_dvh, offs_n, s_dvs, offs_dv),
             dv.to(DV.dtype.element_ty), mask=v_ok)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V, s_ks, s_vs,
             OFF, LEFT, RIGHT, qk_scale, CAP,
             MASKED: tl.constexpr, HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
             BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
             SPLIT: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = (offs_n[:, None] < SK) & (offs_d[None, :] < D)
    v_ok = (offs_n[:, None] < SK) & (offs_dv[None, :] < D_V)
    k = tl.load(_tile(k_base, offs_n, s_ks, offs_d), mask=k_ok, other=0.0)
    v = tl.load(_tile(v_base, offs_n, s_vs, offs_dv), mask=v_ok, other=0.0)
    s = _dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
    slope = s
    if SOFTCAP:
        s, slope = _capped(s, CAP)
    p = tl.exp2(s - lse[:, None])
    if MASKED:
        d = offs_n[None, :] - offs_m[:, None] - OFF
        p = tl.where((d >= -LEFT) & (d <= RIGHT) & (offs_n[None, :] < SK), p, 0.0)
    if HAS_DOCS:
        kd = tl.load(kd_base + offs_n, mask=offs_n < SK, other=0)
        p = tl.where(qd[:, None] == kd[None, :], p, 0.0)
    dp = _dot(do, tl.trans(v), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds = ds * slope
    dq += _dot_lowp(ds, k, PREC, UPCAST, SPLIT)
    return dq


@triton.jit
def dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, QDOC, KDOC,
              qk_scale, sm_scale, CAP,
              s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
              s_dqb, s_dqs, s_dqh, s_qdb, s_kdb,
              H, G, SQ, SK, D, D_V, OFF, LEFT, RIGHT, SQ_KEY, SK_KEY,
              HAS_DOCS: tl.constexpr, SOFTCAP: tl.constexpr,
              PREC: tl.constexpr, UPCAST: tl.constexpr, SPLIT: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    hk = (h // G).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (offs_m[:, None] < SQ) & (offs_d[None, :] < D)
    q = tl.load(_tile(Q + b * s_qb + h * s_qh, offs_m, s_qs, offs_d), mask=ok, other=0.0)
    do_ok = (offs_m[:, None] < SQ) & (offs_dv[None, :] < D_V)
    do = tl.load(_tile(DO + b * s_db + h * s_dh, offs_m, s_ds, offs_dv), mask=do_ok, other=0.0)
    do = do.to(q.dtype)
    lse, delta = _load_row_stats(LSE, DELTA, (b * H + h) * SQ, offs_m, SQ)
    k_base = K + b * s_kb + hk * s_kh
    v_base = V + b * s_vb + hk * s_vh
    qd = offs_m
    kd_base = KDOC
    if HAS_DOCS:
        qd = tl.load(QDOC + b * s_qdb + offs_m, mask=offs_m < SQ, other=0)
        kd_base = KDOC + b * s_kdb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_last = tl.minimum(m0 + BLOCK_M, SQ) - 1
    lo_t, f0, f1, hi = _plan(m0, m_last, SK, OFF, LEFT, RIGHT, BLOCK_N)
    for n0 in range(lo_t, f0, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V, s_ks, s_vs,
                      OFF, LEFT, RIGHT, qk_scale, CAP, True, HAS_DOCS, SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_DV,
                      PREC, UPCAST, SPLIT)
    for n0 in range(f0, f1, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V, s_ks, s_vs,
                      OFF, LEFT, RIGHT, qk_scale, CAP, False, HAS_DOCS, SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_DV,
                      PREC, UPCAST, SPLIT)
    for n0 in range(f1, hi, BLOCK_N):
        dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, kd_base, qd, offs_m, n0, SK, D, D_V, s_ks, s_vs,
                      OFF, LEFT, RIGHT, qk_scale, CAP, True, HAS_DOCS, SOFTCAP, BLOCK_N, BLOCK_D, BLOCK_DV,
                      PREC, UPCAST, SPLIT)
    tl.store(_tile(DQ + b * s_dqb + h * s_dqh, offs_m, s_dqs, offs_d),
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=ok)


# --------------------------------------------------------------------------- autotuning
# (BLOCK_M, BLOCK_N, num_warps, num_stages). Small lists on purpose: every candidate is benchmarked the first
# time a new key is seen. Picked from ptxas resource usage for sm_90 (Triton 3.9, bf16, compiled without
# a GPU): at head_dim 64 all but (64, 64, 8, 2) for dK/dV run without spills; at 128 the 128x128 forward
# tile and the larger dK/dV tiles spill some registers, and at 256 most do. They stay as candidates
# because only a timed run can tell whether the larger tile still wins. Candidates that do not fit in
# shared memory fail to launch and the autotuner scores them as infinitely slow. The forward's last two
# (three stages) were added after the first H200 run measured the forward at 373 TFLOP/s, causal 16k.
FWD_CONFIGS = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 32, 8, 2), (128, 128, 8, 2),
               (64, 32, 4, 2), (128, 64, 8, 3), (128, 128, 8, 3)]
DKDV_CONFIGS = [(32, 64, 8, 2), (64, 32, 8, 2), (32, 32, 8, 2), (32, 32, 4, 1), (32, 128, 8, 2),
                (64, 64, 8, 2)]
DQ_CONFIGS = [(64, 32, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2), (128, 64, 8, 2), (32, 64, 4, 2),
              (32, 32, 4, 1)]
# Triton adds the dtype of every tensor argument to the key itself, so dtype needs no entry here.
AUTOTUNE_KEY = ["D", "D_V", "SQ_KEY", "SK_KEY", "HAS_DOCS", "SOFTCAP"]
_TUNED: dict = {}


def tuned(name: str):
    """The autotuned wrapper of one kernel, built on first use.

    Triton's autotuner caches the winner per key in this process; with `cache_results` (Triton >= 3.2)
    it also stores it in Triton's on-disk cache, which is keyed by kernel source and GPU target, so a
    later process on the same kind of GPU skips the search.
    """
    if name not in _TUNED:
        import inspect

        fn, table = {"fwd": (fwd_kernel, FWD_CONFIGS), "dkdv": (dkdv_kernel, DKDV_CONFIGS),
                     "dq": (dq_kernel, DQ_CONFIGS)}[name]
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
                   for m, n, w, s in table]
        has_disk_cache = "cache_results" in inspect.signature(triton.autotune).parameters
        extra = {"cache_results": True} if has_disk_cache else {}
        _TUNED[name] = triton.autotune(configs=configs, key=AUTOTUNE_KEY, **extra)(fn)
    return _TUNED[name]

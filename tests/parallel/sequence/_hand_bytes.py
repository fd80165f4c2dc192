"""Communication bytes and calls per rank, written from the algorithms (docs/algorithms.md §5-§10, §12).

This module is the test oracle for the Comm counters and for the product's closed-form models, so it must
share nothing with them: it imports nothing from `longctx` and re-derives every head count (K/V head
replication for Ulysses, the de-duplicated KV heads of dilated classes) from first principles. A bug in
the product's helper (say check_heads or dilated's head packing) then moves the counters and the models
together, but not these numbers.

Counting convention (what a rank puts on the wire, comm.py):
  ring send        nbytes of the tensor sent
  all-to-all       floor(nbytes(input) * (W-1) / W)       (the chunk kept is not sent)
  all-gather       (W-1) * nbytes(local chunk)             (a ring all-gather forwards W-1 chunks)
  reduce-scatter   (W-1) * nbytes(output chunk)
  all-reduce       floor(2 * nbytes * (W-1) / W)           (reduce-scatter + all-gather)
A group of one rank sends nothing and records nothing.
"""

from __future__ import annotations

KEYS = ("fwd_bytes", "fwd_calls", "bwd_bytes", "bwd_calls")
RING_FAMILY = ("ring", "zigzag", "striped")


def _zero() -> dict:
    return dict.fromkeys(KEYS, 0)


def _acc(dtype_bytes: int) -> int:
    """Partials and gradients accumulate in fp32, fp64 for fp64 inputs."""
    return 8 if dtype_bytes == 8 else 4


def _all_to_all(nbytes: int, w: int) -> int:
    return nbytes * (w - 1) // w


def _all_reduce(nbytes: int, w: int) -> int:
    return 2 * nbytes * (w - 1) // w


def _split_kv_heads(heads: int, kv_heads: int, degree: int) -> int:
    """K/V heads a rank holds after a head split of `degree`: every rank needs the KV head of its query
    heads, so KV heads are replicated only when there are fewer of them than ranks (max(hkv, W) heads are
    split, max(hkv, W) / W per rank). Replicating when hkv >= W would send copies nobody needs."""
    if heads % degree or (kv_heads % degree and degree % kv_heads):
        raise ValueError(f"heads {heads}, kv_heads {kv_heads} do not split over {degree} ranks")
    return max(kv_heads, degree) // degree


def _ring(w, b, c, hkv, d, e, acc, dv) -> dict:
    """§5: K and V in one buffer (b c hkv (d + dv) e bytes: q/k width d, v width dv) are sent W-1 times
    forward; backward re-sends them W-1 times and the fp32 dK/dV accumulator of each block makes W hops (W-1
    to visit every rank, one more to get home)."""
    if w == 1:
        return _zero()
    kv, dkv = b * c * hkv * (d + dv) * e, b * c * hkv * (d + dv) * acc
    return {"fwd_bytes": (w - 1) * kv, "fwd_calls": w - 1,
            "bwd_bytes": (w - 1) * kv + w * dkv, "bwd_calls": (w - 1) + w}


def _allgather(w, b, c, hkv, d, e, acc, dv) -> dict:
    """§6: one all-gather of the local K and V (one buffer) per pass (backward re-gathers instead of keeping
    the N-long copy), and one reduce-scatter whose output chunk is this rank's fp32 dK/dV."""
    if w == 1:
        return _zero()
    kv, dkv = b * c * hkv * (d + dv) * e, b * c * hkv * (d + dv) * acc
    return {"fwd_bytes": (w - 1) * kv, "fwd_calls": 1, "bwd_bytes": (w - 1) * (kv + dkv), "bwd_calls": 2}


def _ulysses(w, b, c, h, hkv, d, e, dv) -> dict:
    """§7: forward all-to-alls q, k, v (sequence -> heads) and out (heads -> sequence); backward dout in and
    dq, dk, dv back, all in the input dtype. The inputs of the k and v all-to-alls hold the (replicated, if
    W > hkv) max(hkv, W) KV heads of a c-token shard. q, k, dq, dk are d wide; v, out, dout, dv dv wide."""
    if w == 1:
        return _zero()
    kv_heads = _split_kv_heads(h, hkv, w) * w
    per = (_all_to_all(b * c * h * d * e, w) + _all_to_all(b * c * h * dv * e, w)
           + _all_to_all(b * c * kv_heads * d * e, w) + _all_to_all(b * c * kv_heads * dv * e, w))
    return {"fwd_bytes": per, "fwd_calls": 4, "bwd_bytes": per, "bwd_calls": 4}


def expected(strategy: str, *, world: int, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
             dtype_bytes: int, ulysses: int | None = None, v_head_dim: int | None = None) -> dict:
    """Bytes and calls one rank sends in the forward and the backward of one attention call (every rank
    sends the same). `ulysses`: hybrid's Ulysses degree U (the ring degree is world / U); `v_head_dim`: v's
    width when it is not q's and k's."""
    b, n, h, hkv, d, e = batch, seq_len, heads, kv_heads, head_dim, dtype_bytes
    dv = head_dim if v_head_dim is None else v_head_dim
    acc = _acc(e)
    if strategy in RING_FAMILY:
        return _ring(world, b, n // world, hkv, d, e, acc, dv)
    if strategy == "allgather":
        return _allgather(world, b, n // world, hkv, d, e, acc, dv)
    if strategy == "ulysses":
        return _ulysses(world, b, n // world, h, hkv, d, e, dv)
    if strategy == "hybrid":
        # §8: Ulysses over U on the c = N/W hybrid shard, then the ring over R = W/U on the rebuilt ring
        # shard (N/R tokens) with the H/U query heads and max(hkv, U)/U KV heads a rank holds after the split
        u = ulysses or 1
        ring = world // u
        part_u = _ulysses(u, b, n // world, h, hkv, d, e, dv)
        part_r = _ring(ring, b, n // ring, _split_kv_heads(h, hkv, u), d, e, acc, dv)
        return {k: part_u[k] + part_r[k] for k in KEYS}
    raise ValueError(f"unknown strategy {strategy!r}")


# ---------------------------------------------------------------------------------------------- dilated
def distinct_kv_heads(heads: int, kv_heads: int, rate: int) -> int:
    """Packed sparse K (or V) heads of one pattern (§10.3): class o (query heads o, o+r, ... < H; only
    o < min(r, H) have heads) needs the KV heads {j // (H/H_kv)} of those query heads, each ONCE."""
    group = heads // kv_heads
    return sum(len({j // group for j in range(o, heads, rate)}) for o in range(min(rate, heads)))


def expected_dilated(*, world: int, batch: int, seq_len: int, heads: int, kv_heads: int, head_dim: int,
                     dtype_bytes: int, segment_lengths, dilation_rates) -> dict:
    """§10.5/§12.5: a pattern whose segment (cut to N) fits in a rank's l = N/W tokens runs locally and
    sends nothing. One spanning g = w/l ranks all-gathers, inside its g-rank segment group, the local
    packed sparse K/V (2, B, l/r, Hs, D) in the input dtype, and in backward reduce-scatters the fp32 dK/dV
    of the same shape (output chunk); the gathered K/V are kept, so there is no re-gather. Causal gathers
    the whole segment as well (one collective), so it moves the same."""
    acc = _acc(dtype_bytes)
    l = seq_len // world
    res = _zero()
    for w, r in zip(segment_lengths, dilation_rates):
        w = min(w, seq_len)
        if w <= l:
            continue
        g = w // l
        chunk = 2 * batch * (l // r) * distinct_kv_heads(heads, kv_heads, r) * head_dim
        res["fwd_bytes"] += (g - 1) * chunk * dtype_bytes
        res["bwd_bytes"] += (g - 1) * chunk * acc
        res["fwd_calls"] += 1
        res["bwd_calls"] += 1
    return res


# ---------------------------------------------------------------------------------------------- decoding
def expected_tree(*, world: int, batch: int, q_len: int, heads: int, head_dim: int, dtype_bytes: int,
                  collectives: int = 2) -> dict:
    """§9/§12.4, one tree_decode (phase 'decode'; keys named like the product's model). The partials are in
    the accumulation dtype whatever the input. Two collectives: all-reduce max of the lse (B, H, Sq), then
    all-reduce sum of [o * w | w] (B, Sq, H, D+1). One collective: all-gather of [o | lse] (B, Sq, H, D+1)."""
    if world == 1:
        return {"fwd_bytes": 0, "fwd_calls": 0}
    acc = _acc(dtype_bytes)
    rows = batch * q_len * heads
    if collectives == 1:
        return {"fwd_bytes": (world - 1) * rows * (head_dim + 1) * acc, "fwd_calls": 1}
    return {"fwd_bytes": _all_reduce(rows * acc, world) + _all_reduce(rows * (head_dim + 1) * acc, world),
            "fwd_calls": 2}


def expected_ring_decode(*, world: int, batch: int, context: int, kv_heads: int, head_dim: int,
                         dtype_bytes: int) -> dict:
    """§9/§12.4, one ring_decode over a round-robin cache of `context` tokens (phase 'decode'; the optional
    shard-length gather is under 'decode_meta'): K and V packed in one buffer padded to the longest shard,
    ceil(T/W) tokens, sent W-1 times in the input dtype. An empty cache moves nothing."""
    s_max = -(-context // world)
    if world == 1 or s_max == 0:
        return {"fwd_bytes": 0, "fwd_calls": 0}
    return {"fwd_bytes": (world - 1) * 2 * batch * s_max * kv_heads * head_dim * dtype_bytes,
            "fwd_calls": world - 1}

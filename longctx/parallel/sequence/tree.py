"""Tree attention decoding over a sequence-sharded KV cache (docs/algorithms.md §9).

The new query tokens are replicated on every rank; the KV cache is split along the sequence. Each rank
attends its own shard with the local kernel, and the partials combine exactly through their log-sum-exp.
Two collectives suffice: an all-reduce MAX of the lse, then one all-reduce SUM of the fused buffer
[o * exp(lse - m), exp(lse - m)] (numerator and denominator side by side). Nothing in it depends on the
context length, which is why tree beats ring at decode time, where ring has to move the whole cache.

LSE layout (docs/algorithms.md §9): the kernel's lse is (B, H, Sq); it is transposed to (B, Sq, H, 1) before it
meets an output (B, Sq, H, D), so any batch size broadcasts correctly.
Empty shards (context shorter than the world) contribute lse = -inf, hence weight 0; a row that is empty on
every rank keeps out = 0 and lse = -inf instead of 0/0.

Decoding is inference: these functions build no autograd graph.
"""

from __future__ import annotations

import torch

from ... import kernels
from ..comm import Comm
from .schedule import pack_kv, unpack_kv

_INF = float("inf")
PHASE = "decode"


def _doc_mask(lengths, batch: int, sq: int, sk: int, device) -> kernels.Mask | None:
    """Ragged caches: key j of batch row b is valid iff j < lengths[b] (one document per row)."""
    if lengths is None:
        return None
    lengths = torch.as_tensor(lengths, device=device).reshape(-1).long()
    if lengths.numel() != batch or bool((lengths < 0).any()) or bool((lengths > sk).any()):
        raise ValueError(
            f"lengths must hold one valid-token count in [0, {sk}] per batch row ({batch} rows), got "
            f"{lengths.tolist()}; pass the number of filled cache slots of each row of this shard"
        )
    k_doc = (torch.arange(sk, device=device)[None, :] >= lengths[:, None]).long()
    return kernels.Mask.documents(torch.zeros(batch, sq, dtype=torch.long, device=device), k_doc)


def _start_mask(key_start, k_positions, batch: int, sq: int, device) -> kernels.Mask:
    """Rows of a batch whose keys begin later (left-padded prompts): key j of row b is valid iff its global
    position k_positions[j] >= key_start[b]."""
    starts = torch.as_tensor(key_start, device=device).reshape(-1).long()
    if starts.numel() != batch:
        raise ValueError(f"key_start must hold one first-valid position per batch row ({batch}), got "
                         f"{starts.numel()}")
    kpos = torch.as_tensor(k_positions, device=device).reshape(1, -1)
    valid = (kpos >= starts[:, None]).long()
    return kernels.Mask.documents(torch.ones(batch, sq, dtype=torch.long, device=device), valid)


def local_partial(q, k, v, *, scale, kernel="auto", lengths=None, q_positions=None, k_positions=None,
                  key_start=None, softcap=None):
    """This rank's (out, lse) in the accumulation dtype. With positions given, query i sees only the
    local keys whose global position is <= its own (causal over the new tokens); else every key. With
    key_start (B,) and k_positions, keys before key_start[b] are invisible to row b. `softcap`: logit soft-capping
    (kernels.registry)."""
    b, sq, h, _ = q.shape
    sk = k.shape[1]
    acc = kernels.acc_dtype(q.dtype)
    out, lse = kernels.empty_state(b, sq, h, v.shape[-1], device=q.device, dtype=acc)
    if key_start is not None:
        if q_positions is not None or lengths is not None:
            raise ValueError("key_start cannot be combined with causal_new or lengths")
        if sq == 0 or sk == 0:
            return out, lse
        return kernels.forward(q, k, v, scale=scale, mask=_start_mask(key_start, k_positions, b, sq, q.device),
                               backend=kernel, out_dtype=acc, softcap=softcap)
    if lengths is not None:
        _doc_mask(lengths, b, sq, sk, q.device)  # validates
        lengths = torch.as_tensor(lengths, device=q.device).reshape(-1).long()
    if sq == 0 or sk == 0:  # the kernels do not take empty blocks; an empty shard is the merge identity
        return out, lse
    if q_positions is None:
        o, l = kernels.forward(q, k, v, scale=scale, mask=_doc_mask(lengths, b, sq, sk, q.device),
                               backend=kernel, out_dtype=acc, softcap=softcap)
        return o, l
    # shard positions are increasing, so query i sees a prefix of the shard; rows with equal prefixes
    # share one kernel call
    qpos = torch.as_tensor(q_positions).reshape(-1).cpu()
    kpos = torch.as_tensor(k_positions).reshape(-1).cpu()
    if qpos.numel() != sq or kpos.numel() != sk:
        raise ValueError(f"q_positions needs {sq} entries (one per new token) and k_positions {sk} (one per key "
                         f"of this shard), got {qpos.numel()} and {kpos.numel()}; pass the global positions of "
                         "the new tokens and of this shard's keys (ShardedKVCache.decode passes both)")
    prefix = torch.searchsorted(kpos, qpos, right=True).tolist()
    for n in sorted(set(prefix)):
        if n == 0:
            continue
        rows = [i for i, p in enumerate(prefix) if p == n]
        sel = torch.tensor(rows, device=q.device)
        mask = None if lengths is None else _doc_mask(lengths.clamp(max=n), b, len(rows), n, q.device)
        o, l = kernels.forward(q[:, sel], k[:, :n], v[:, :n], scale=scale, mask=mask, backend=kernel,
                               out_dtype=acc, softcap=softcap)
        out[:, sel] = o
        lse[:, :, sel] = l
    return out, lse


def tree_combine(out, lse, comm: Comm, *, collectives: int = 2):
    """Exact combine of every rank's partial (out (B,Sq,H,D), lse (B,H,Sq)) into the global (out, lse)."""
    if collectives not in (1, 2):  # checked before the world-of-one shortcut, so a typo fails at any world size
        raise ValueError(f"collectives must be 1 (all-gather + local merge) or 2 (max + fused sum), "
                         f"got {collectives!r}")
    lse = torch.where(lse == _INF, torch.full_like(lse, -_INF), lse)  # flash's empty-row +inf is "no keys"
    if comm.world == 1:
        return out, lse
    if collectives == 1:
        # one all-gather of (o, lse) and a local merge: fewer latencies, W-1 times the bytes
        packed = torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], dim=-1)
        parts = torch.stack(comm.all_gather(packed, phase=PHASE))
        return kernels.merge_many(parts[..., :-1], parts[..., -1].transpose(2, 3))
    m = comm.all_reduce(lse.clone(), phase=PHASE, op="max")
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lse - m_safe).transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1): broadcasts for any batch
    buf = comm.all_reduce(torch.cat([out * w, w], dim=-1), phase=PHASE, op="sum")
    num, den = buf[..., :-1], buf[..., -1:]
    ok = den > 0
    res = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
    den_bhs = den.squeeze(-1).transpose(1, 2)
    ok_bhs = den_bhs > 0
    glse = torch.where(ok_bhs, m_safe + torch.log(torch.where(ok_bhs, den_bhs, torch.ones_like(den_bhs))),
                       torch.full_like(den_bhs, -_INF))
    return res, glse


@torch.no_grad()
def tree_decode(q, k_local, v_local, group=None, *, scale=None, kernel="auto", lengths=None,
                causal_new=False, q_positions=None, k_positions=None, collectives=2, return_lse=False,
                key_start=None, softcap=None):
    """Attention of replicated new queries q (B, Sq, H, D) over a sequence-sharded cache (B, S_r, H_kv, D).

    Default semantics: every query sees every cached key (of every rank). `causal_new=True` is for
    Sq > 1 new tokens that are already in the cache: query i sees only keys at global positions <=
    q_positions[i]; give q_positions (Sq,) and this shard's increasing k_positions (S_r,)
    (ShardedKVCache.decode fills both). `lengths` (B,) marks how many slots of each batch row of this shard
    are filled (ragged caches); `key_start` (B,) with k_positions hides keys before key_start[b] from row b
    (left-padded prompts). Returns out in q's dtype (and the global lse (B, H, Sq) if return_lse).
    """
    scale, _ = kernels.validate(q, k_local, v_local, scale, None)
    if causal_new and (q_positions is None or k_positions is None):
        raise ValueError("causal_new=True needs q_positions (global positions of the new tokens) and "
                         "k_positions (this shard's global positions); ShardedKVCache.decode passes both")
    if key_start is not None and k_positions is None:
        raise ValueError("key_start hides keys by their global position: give k_positions (this shard's global "
                         "positions, (S_r,)) too; ShardedKVCache.decode passes both")
    comm = Comm.get(group)
    o, l = local_partial(q, k_local, v_local, scale=scale, kernel=kernel, lengths=lengths,
                         q_positions=q_positions if causal_new else None,
                         k_positions=k_positions if causal_new or key_start is not None else None,
                         key_start=key_start, softcap=softcap)
    out, lse = tree_combine(o, l, comm, collectives=collectives)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


@torch.no_grad()
def ring_decode(q, k_local, v_local, group=None, *, scale=None, kernel="auto", shard_lens=None,
                return_lse=False, key_start=None, softcap=None):
    """Baseline: the KV shards travel W-1 hops around the ring (K and V packed in one buffer, padded to the
    longest shard) and every rank merges the partials locally. Same result as tree_decode.

    `shard_lens` lists every rank's shard length (ShardedKVCache.shard_lengths()); if None it is
    all-gathered first (counted under the 'decode_meta' phase, not 'decode'). `key_start` (B,): keys at
    global positions before key_start[b] are invisible to row b (shards follow the cache's round-robin
    positions: rank r holds r, r+W, ...).
    """
    scale, _ = kernels.validate(q, k_local, v_local, scale, None)
    comm = Comm.get(group)
    b, sq, h, _ = q.shape
    n_local = k_local.shape[1]
    if shard_lens is None:
        got = comm.all_gather(torch.tensor([n_local], device=q.device), phase=PHASE + "_meta")
        shard_lens = [int(t.item()) for t in got]
    shard_lens = [int(s) for s in shard_lens]
    if len(shard_lens) != comm.world or shard_lens[comm.rank] != n_local:
        raise ValueError(f"shard_lens must list all {comm.world} ranks' shard lengths with this rank's = "
                         f"{n_local}, got {shard_lens}; pass ShardedKVCache.shard_lengths(), or None to gather them")
    s_max = max(shard_lens)
    acc = kernels.acc_dtype(q.dtype)
    out, lse = kernels.empty_state(b, sq, h, v_local.shape[-1], device=q.device, dtype=acc)
    packed = pack_kv(k_local, v_local)
    seq_dim = packed.dim() - 3  # (2, B, S, H, D) or, for v of another width, (B, S, H, D + Dv)
    kv = packed.new_zeros((*packed.shape[:seq_dim], s_max, *packed.shape[seq_dim + 1:]))
    kv.narrow(seq_dim, 0, n_local).copy_(packed)
    hops = comm.world - 1 if s_max > 0 else 0  # nothing to move when the whole cache is empty
    for s in range(comm.world):
        pending = comm.ring_exchange(kv, phase=PHASE) if s < hops else None
        n = shard_lens[(comm.rank - s) % comm.world]
        if n > 0 and sq > 0:
            src = (comm.rank - s) % comm.world
            mask = None if key_start is None else _start_mask(key_start, src + comm.world * torch.arange(n), b, sq,
                                                              q.device)
            k_src, v_src = unpack_kv(kv, k_local.shape[-1])
            o, l = kernels.forward(q, k_src[:, :n], v_src[:, :n], scale=scale, mask=mask, backend=kernel,
                                   out_dtype=acc, softcap=softcap)
            kernels.merge_(out, lse, o, l)
        if pending is not None:
            kv = pending.wait()
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# ---------------------------------------------------------------------------------------------- cache
class ShardedKVCache:
    """A KV cache split round-robin over the ranks of a group: global token t lives on rank t mod W at local
    slot t // W. Appends therefore keep shards within one token of each other, and a rank's positions are
    rank, rank+W, ... (the 'striped' layout of layouts.py, so a striped prefill can be adopted as is).

    K/V of new tokens are passed replicated (decode computes them from the replicated new hidden states);
    each rank keeps its own tokens. Works for any batch size; storage grows by doubling.
    """

    def __init__(self, group=None, *, rank: int | None = None, world: int | None = None):
        if rank is None or world is None:
            comm = Comm.get(group)
            rank, world = comm.rank, comm.world
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is outside a world of {world} ranks; pass 0 <= rank < world, or "
                             "neither to read both from the group")
        self.group, self.rank, self.world = group, rank, world
        self.total = 0  # global number of cached tokens
        self._k = self._v = None
        self._n = 0  # local number of cached tokens

    @staticmethod
    def shard_len(total: int, rank: int, world: int) -> int:
        return max(0, (total - rank + world - 1) // world)

    def shard_lengths(self) -> list[int]:
        return [self.shard_len(self.total, r, self.world) for r in range(self.world)]

    def global_positions(self) -> torch.Tensor:
        """Global positions of this rank's cached tokens, in slot order (also the RoPE positions)."""
        return torch.arange(self.rank, max(self.rank, self.total), self.world)

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :self._n]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :self._n]

    def reset(self) -> None:
        self.total, self._n, self._k, self._v = 0, 0, None, None

    def prefill(self, k_full: torch.Tensor, v_full: torch.Tensor) -> None:
        """Replace the cache by a whole prompt's K/V (B, T, H_kv, D), replicated on every rank."""
        self.reset()
        self.append(k_full, v_full)

    def prefill_local(self, k_local: torch.Tensor, v_local: torch.Tensor, total: int) -> None:
        """Adopt this rank's shard of a prompt of `total` tokens already laid out round-robin (striped)."""
        want = self.shard_len(total, self.rank, self.world)
        if k_local.shape[1] != want or v_local.shape[1] != want:
            raise ValueError(f"a {total}-token prompt puts {want} tokens on rank {self.rank} of {self.world} "
                             f"(striped layout), got k/v with {k_local.shape[1]}/{v_local.shape[1]}; pass this "
                             f"rank's tokens {self.rank}, {self.rank + self.world}, ... of the prompt (or fix total)")
        self.reset()
        self._store(k_local, v_local)
        self.total = total

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Add n new tokens (B, n, H_kv, D) at global positions total .. total+n-1."""
        if k_new.dim() != 4 or v_new.dim() != 4 or k_new.shape[:3] != v_new.shape[:3]:
            raise ValueError(f"k_new and v_new must both be (batch, n, kv_heads, head_dim) (v's head_dim may "
                             f"differ), got {tuple(k_new.shape)} and {tuple(v_new.shape)}")
        first = (self.rank - self.total) % self.world  # index in k_new of the first token that is ours
        self._store(k_new[:, first::self.world], v_new[:, first::self.world])
        self.total += k_new.shape[1]

    def _store(self, k, v) -> None:
        if self._k is None:
            cap = max(16, k.shape[1])
            self._k = k.new_empty((k.shape[0], cap, *k.shape[2:]))
            self._v = v.new_empty((v.shape[0], cap, *v.shape[2:]))
        elif k.shape[0] != self._k.shape[0] or k.shape[2:] != self._k.shape[2:] or k.dtype != self._k.dtype \
                or v.shape[2:] != self._v.shape[2:]:
            raise ValueError(f"new K/V {tuple(k.shape)} {tuple(v.shape)} {k.dtype} do not match the cache's "
                             f"(batch, *, kv_heads, head_dim) = {tuple(self._k.shape)} {tuple(self._v.shape)} "
                             f"{self._k.dtype}; call reset() for a new batch")
        need = self._n + k.shape[1]
        if need > self._k.shape[1]:
            cap = max(need, 2 * self._k.shape[1])
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = old.new_empty((old.shape[0], cap, *old.shape[2:]))
                new[:, :self._n] = old[:, :self._n]
                setattr(self, name, new)
        self._k[:, self._n:need] = k
        self._v[:, self._n:need] = v
        self._n = need

    def decode(self, q, *, strategy: str = "tree", causal_new: bool = False, key_start=None, **kwargs):
        """Attention of new queries q (B, Sq, H, D) over the whole cache (see tree_decode / ring_decode).

        With causal_new, the Sq queries are the last Sq cached tokens and each sees positions <= its own.
        key_start (B,): row b sees only cached positions >= key_start[b] (its prompt was left-padded).
        """
        if self._k is None:
            raise ValueError("the cache is empty on every rank; prefill() or append() before decode()")
        if key_start is not None:
            kwargs["key_start"] = key_start
        if strategy == "tree":
            pos = {"k_positions": self.global_positions()} if key_start is not None else {}
            if causal_new:
                pos = dict(q_positions=torch.arange(self.total - q.shape[1], self.total),
                           k_positions=self.global_positions())
            return tree_decode(q, self.k, self.v, self.group, causal_new=causal_new, **pos, **kwargs)
        if strategy == "ring":
            if causal_new:
                raise ValueError("ring_decode has no causal_new; use strategy='tree'")
            return ring_decode(q, self.k, self.v, self.group, shard_lens=self.shard_lengths(), **kwargs)
        raise ValueError(f"unknown decode strategy {strategy!r}; choose 'tree' or 'ring'")


# ---------------------------------------------------------------------------------------------- models
def _allreduce_bytes(nbytes: int, world: int) -> int:
    return 2 * nbytes * (world - 1) // world  # comm.py's convention, integer division included


def tree_comm_model(world: int, batch: int, q_len: int, heads: int, head_dim: int, dtype_bytes: int, *,
                    collectives: int = 2) -> dict:
    """Bytes and calls one rank sends per tree_decode: independent of the context length. The combine runs
    in the accumulation dtype (fp32, fp64 for fp64 inputs) whatever the input dtype."""
    if collectives not in (1, 2):
        raise ValueError(f"collectives must be 1 (all-gather + local merge) or 2 (max + fused sum), "
                         f"got {collectives!r}")
    if world == 1:
        return {"fwd_bytes": 0, "fwd_calls": 0}
    acc = 8 if dtype_bytes == 8 else 4
    rows = batch * q_len * heads
    if collectives == 1:
        return {"fwd_bytes": (world - 1) * rows * (head_dim + 1) * acc, "fwd_calls": 1}
    fused = _allreduce_bytes(rows * (head_dim + 1) * acc, world)  # [numerator, denominator]
    return {"fwd_bytes": _allreduce_bytes(rows * acc, world) + fused, "fwd_calls": 2}


def ring_decode_comm_model(world: int, batch: int, shard_len: int, kv_heads: int, head_dim: int,
                           dtype_bytes: int, v_head_dim: int | None = None) -> dict:
    """Bytes and calls one rank sends per ring_decode: W-1 hops of the packed K/V shard (shard_len = the
    longest shard, ceil(context / W) for the round-robin cache): grows linearly with the context.
    `v_head_dim`: v's width where it is not k's."""
    if world == 1 or shard_len == 0:
        return {"fwd_bytes": 0, "fwd_calls": 0}
    width = head_dim + (head_dim if v_head_dim is None else v_head_dim)
    return {"fwd_bytes": (world - 1) * batch * shard_len * kv_heads * width * dtype_bytes,
            "fwd_calls": world - 1}

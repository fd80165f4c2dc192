"""The chunked loss: exact against cross_entropy of full logits, and never more than one chunk of logits."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from longctx.train import SavedTensorCounter, chunked_cross_entropy


def _problem(t=37, d=16, v=50, dtype=torch.float64, ignored=10):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(t, d, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(v, d, dtype=dtype, generator=g, requires_grad=True)
    y = torch.randint(0, v, (t,), generator=g)
    y[:ignored] = -100
    return h, w, y


@pytest.mark.parametrize("chunk", [1, 5, 36, 37, 100, 0])
def test_matches_cross_entropy_of_all_logits(chunk):
    h, w, y = _problem()
    ref = F.cross_entropy(h @ w.t(), y, reduction="sum", ignore_index=-100)
    gh, gw = torch.autograd.grad(ref * 1.7, (h, w))
    got = chunked_cross_entropy(h, w, y, chunk=chunk)
    a, b = torch.autograd.grad(got * 1.7, (h, w))
    assert abs(got.item() - ref.item()) <= 1e-12 * abs(ref.item())
    assert (a - gh).abs().max() <= 1e-12 and (b - gw).abs().max() <= 1e-12


@pytest.mark.parametrize("chunk", [5, 0])
def test_soft_capped_logits(chunk):
    # Gemma 2's final_logit_softcapping: cap * tanh(logits / cap) written out here, differentiated by autograd;
    # the logits are ~N(0, 16), so a cap of 3 bends nearly all of them (the capped loss is far from the plain)
    h, w, y = _problem()
    capped = 3.0 * torch.tanh((h @ w.t()) / 3.0)
    ref = F.cross_entropy(capped, y, reduction="sum", ignore_index=-100)
    gh, gw = torch.autograd.grad(ref * 1.7, (h, w))
    got = chunked_cross_entropy(h, w, y, chunk=chunk, softcap=3.0)
    a, b = torch.autograd.grad(got * 1.7, (h, w))
    assert abs(got.item() - ref.item()) <= 1e-12 * abs(ref.item())
    assert (a - gh).abs().max() <= 1e-12 and (b - gw).abs().max() <= 1e-12
    assert abs(chunked_cross_entropy(h, w, y, chunk=chunk).item() - ref.item()) > 0.1 * ref.item()
    with torch.no_grad():  # the evaluation path (no gradients kept) caps too
        assert abs(chunked_cross_entropy(h, w, y, chunk=chunk, softcap=3.0).item() - ref.item()) <= 1e-9


def test_all_labels_ignored_is_zero_and_finite():
    h, w, y = _problem(ignored=37)
    loss = chunked_cross_entropy(h, w, y, chunk=8)
    a, b = torch.autograd.grad(loss, (h, w))
    assert loss.item() == 0 and a.abs().max() == 0 and b.abs().max() == 0


def test_fp32_and_only_weight_grad():
    h, w, y = _problem(dtype=torch.float32)
    h = h.detach()
    ref = F.cross_entropy(h.double() @ w.double().t(), y, reduction="sum")
    got = chunked_cross_entropy(h, w, y, chunk=7)
    (b,) = torch.autograd.grad(got, (w,))
    assert abs(got.item() - ref.item()) <= 1e-5 * abs(ref.item()) and b.dtype == torch.float32


def test_bad_arguments():
    h, w, y = _problem()
    with pytest.raises(ValueError, match="hidden must be"):
        chunked_cross_entropy(h[None], w, y)
    with pytest.raises(ValueError, match="train.loss_chunk must be an int"):
        chunked_cross_entropy(h, w, y, chunk=2.5)


class LiveVocabTensors(TorchDispatchMode):
    """Peak bytes of simultaneously alive tensors whose last dimension is the vocabulary (logits and their
    gradients), counted at every op output that allocated new storage, freed when that tensor dies."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.live, self.peak, self._ptrs = vocab, 0, 0, set()

    def _free(self, ptr, nbytes):
        self._ptrs.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        flat_in = tree_flatten((args, kwargs))[0]
        inputs = {a.untyped_storage().data_ptr() for a in flat_in if isinstance(a, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                ptr, nbytes = t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()
                if ptr not in self._ptrs and ptr not in inputs:  # views and in-place results are not new
                    self._ptrs.add(ptr)
                    self.live += nbytes
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(t, self._free, ptr, nbytes)
        return out


def _loss_memory(chunk, tokens=512, dim=32, vocab=1000):
    h, w, y = _problem(t=tokens, d=dim, v=vocab, dtype=torch.float32, ignored=0)
    with LiveVocabTensors(vocab) as live, SavedTensorCounter() as saved:
        loss = chunked_cross_entropy(h, w, y, chunk=chunk)
    with LiveVocabTensors(vocab) as live_bwd:
        loss.backward()
    return live.peak, live_bwd.peak, saved


def test_chunked_loss_keeps_at_most_one_chunk_of_logits_alive():
    vocab, tokens, chunk = 1000, 512, 64
    peak, peak_bwd, saved = _loss_memory(chunk, tokens, vocab=vocab)
    one_chunk = chunk * vocab * 4
    assert 0 < peak <= one_chunk, (peak, one_chunk)  # never two chunks' logits at once
    assert peak_bwd == 0  # the backward only scales the saved (tokens x dim) and (vocab x dim) gradients
    assert not any(shape[-1] == vocab for shape in saved.by_shape), saved.by_shape  # no logits kept
    # the plain path holds all (tokens x vocab) logits, and keeps them for backward
    peak_plain, _, saved_plain = _loss_memory(0, tokens, vocab=vocab)
    assert peak_plain >= tokens * vocab * 4 and saved_plain.by_shape.get((tokens, vocab), 0) >= tokens * vocab * 4


def test_no_grad_computes_the_loss_only():
    vocab, tokens = 1000, 256
    h, w, y = _problem(t=tokens, d=16, v=vocab, dtype=torch.float32, ignored=3)
    ref = chunked_cross_entropy(h, w, y, chunk=64).item()
    with torch.no_grad(), LiveVocabTensors(vocab) as live:
        loss = chunked_cross_entropy(h, w, y, chunk=64)
    assert not loss.requires_grad and abs(loss.item() - ref) <= 1e-6 * abs(ref)
    assert live.peak <= 64 * vocab * 4  # no gradient work, still one chunk at a time


def test_saved_tensor_counter_counts_a_freed_and_reused_address_again():
    # a pipeline runs backward inside the counted block: microbatch 1's saved tensors are freed before
    # microbatch 2's forward, whose tensors may get the same addresses; both must be counted
    torch.manual_seed(0)
    layer = torch.nn.Linear(256, 256)

    def step():  # a fresh input per microbatch, as a pipeline stage receives it
        torch.tanh(layer(torch.randn(64, 256)) * 2).sum().backward()

    with SavedTensorCounter(layer) as once:
        step()
    with SavedTensorCounter(layer) as twice:
        for _ in range(4):
            step()
    assert once.bytes > 0 and twice.bytes == 4 * once.bytes, (once.bytes, twice.bytes)


def test_a_step_without_real_labels_records_no_loss(tmp_path):
    """A global batch whose every label is ignored has no loss: NaN in its record (as validation reports), not
    0.0 (a perfect prediction); its gradient is zero and training goes on."""
    import math

    from longctx.launch import run

    from ._workers import config, first_batch_unlabelled

    history = run(first_batch_unlabelled, 2, args=(config("parallel.cp=2", "train.steps=2",
                                                          run_dir=str(tmp_path / "run")),), timeout=180)[0]
    first, second = history
    assert math.isnan(first["loss"]) and first["loss_tokens"] == 0 and first["grad_norm"] == 0.0
    assert math.isfinite(second["loss"]) and second["loss_tokens"] > 0

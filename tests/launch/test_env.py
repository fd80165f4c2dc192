"""The epoch handshake that keeps a restarted torchrun attempt from reading a dead attempt's addresses:
every rank of an attempt agrees on one epoch no earlier attempt used, whatever the dead attempts left in the
store and however far they got."""

import threading

import pytest
import torch.distributed as dist

from longctx.launch.env import fresh_epoch


def _attempt(store, world, order, timeout_s=10.0):
    """Run fresh_epoch on every rank of one attempt (threads, ranks started in `order`); the epochs."""
    epochs, errors = {}, []

    def rank_main(rank):
        try:
            epochs[rank] = fresh_epoch(store, rank, world, timeout_s, max_delay_s=0.02)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in order]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return epochs


def test_every_attempt_agrees_on_an_unused_epoch():
    store = dist.HashStore()
    seen = set()
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]):  # followers first: they read a stale "current"
        epochs = _attempt(store, 4, order)
        assert len(set(epochs.values())) == 1 and len(epochs) == 4, epochs
        assert not seen & set(epochs.values())
        seen |= set(epochs.values())


def test_leftovers_of_a_dead_attempt_are_not_taken_for_this_one():
    store = dist.HashStore()
    _attempt(store, 3, [0, 1, 2])  # a whole attempt
    # a dead attempt: rank 0 opened epoch 2 and died before answering; rank 1 had posted to it
    store.add("longctx/epoch", 1)
    store.set("longctx/current", "2")
    store.set("longctx/2/start/1", str(store.add("longctx/starts/1", 1)))
    epochs = _attempt(store, 3, [2, 1, 0])
    assert set(epochs.values()) == {3}
    # a world of one needs nobody
    assert fresh_epoch(store, 0, 1, 1.0) == 4


def test_a_missing_rank_times_out_with_a_message():
    store = dist.HashStore()
    with pytest.raises(TimeoutError, match=r"rank 1: rank 0 did not open.*parallel.timeout_s=0.2"):
        fresh_epoch(store, 1, 2, 0.2, max_delay_s=0.02)  # no rank 0 ever
    with pytest.raises(TimeoutError, match=r"rank 0: the other 1 rank\(s\).*parallel.timeout_s=0.2"):
        fresh_epoch(dist.HashStore(), 0, 2, 0.2)
    store.set("longctx/current", "7")  # a rank 0 that opened an epoch and never answered
    with pytest.raises(TimeoutError, match="rank 1: rank 0 did not open"):
        fresh_epoch(store, 1, 2, 0.3, max_delay_s=0.02)

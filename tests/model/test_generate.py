"""Generation: context-parallel prefill + tree decoding equals single-device greedy generation, for longctx's
Transformer (full causal and sliding-window layers) and for Hugging Face models through their own layers."""

import pytest
import torch

from longctx.launch import run

from ._gen_workers import greedy_reference, prompts, run_cases, tiny_model, tp_cases

LENGTHS = [13, 6]  # unequal prompts, batch 2


def _reference(lengths, steps, *extra):
    model = tiny_model(*extra)
    return [greedy_reference(model, p, steps) for p in prompts(lengths)]


def _same(ref, r, label):
    for row, (tokens, logits) in enumerate(ref):
        assert r["tokens"][row] == tokens.tolist(), (label, row)
        err = (r["logits"][:, row] - logits).abs().max().item()
        assert err <= 1e-5, (label, row, err)


@pytest.mark.parametrize("world", [2, 4])
def test_tree_decoding_equals_single_device_greedy(world):
    steps = 6
    cases = [dict(strategy=s, decode=d, lengths=LENGTHS, steps=steps)
             for s, d in (("zigzag", "tree"), ("striped", "tree"), ("ulysses", "tree"), ("allgather", "ring"))]
    cases += [dict(strategy="zigzag", decode="tree", lengths=[n, n], steps=3) for n in (9, 41)]
    ref = _reference(LENGTHS, steps)
    results = run(run_cases, world, args=(cases,), timeout=180)
    for rank, per_rank in enumerate(results):
        for case, r in zip(cases[:4], per_rank[:4]):
            for row, (tokens, logits) in enumerate(ref):
                assert r["tokens"][row] == tokens.tolist(), (world, rank, case, row)
                err = (r["logits"][:, row] - logits).abs().max().item()
                assert err <= 1e-5, (world, rank, case, row, err)
        short, long = per_rank[4], per_rank[5]
        assert short["prompt_len"] < long["prompt_len"]
        # tree decoding moves the same bytes per token whatever the context length
        assert short["decode_bytes_per_token"] == long["decode_bytes_per_token"] > 0


def test_one_process_and_sampling():
    model = tiny_model()
    ps = prompts(LENGTHS)
    ref = _reference(LENGTHS, 4)
    res = model.generate(ps, max_new_tokens=4, return_logits=True)
    for row, (tokens, logits) in enumerate(ref):
        assert res.tokens[row].tolist() == tokens.tolist()
        assert (torch.stack(res.logits)[:, row] - logits).abs().max() <= 1e-5
    a = model.generate(ps, max_new_tokens=5, temperature=1.0, top_k=5, seed=3)
    b = model.generate(ps, max_new_tokens=5, temperature=1.0, top_k=5, seed=3)
    assert [t.tolist() for t in a.tokens] == [t.tolist() for t in b.tokens]
    eos = ref[0][0][1].item()
    stopped = model.generate(ps[:1], max_new_tokens=6, eos_id=eos)
    assert stopped.tokens[0].tolist() == ref[0][0][:2].tolist()  # stops at (and keeps) the eos token
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ps, max_new_tokens=0)
    with pytest.raises(ValueError, match="decode='beam'"):
        model.generate(ps, max_new_tokens=1, decode="beam")
    with pytest.raises(ValueError, match="strategy='hybrid' needs a \\(ring, ulysses\\) mesh"):
        model.generate(ps, max_new_tokens=1, strategy="hybrid")
    with pytest.raises(ValueError, match="non-empty 1-D"):
        model.generate([torch.tensor([], dtype=torch.long)], max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompts must be a list of 1-D token tensors .*not a Tensor; for a \(B, S\) "
                                         r"tensor pass list\(tensor\)"):
        model.generate(torch.stack(ps[:1]), max_new_tokens=1)
    with pytest.raises(ValueError, match="dilated layers"):
        tiny_model("model.dilated.layers=[1]", "model.dilated.segment_lengths=[8]",
                   "model.dilated.dilation_rates=[2]").generate(ps, max_new_tokens=1)


WINDOW = ["model.window=5"]  # prompts of 13 and 6 tokens + 6 new: the window cuts in prefill and in decoding


def test_sliding_window_layers_decode_inside_their_window():
    ref = _reference(LENGTHS, 6, *WINDOW)
    assert (ref[0][1] - _reference(LENGTHS, 6)[0][1]).abs().max() > 1e-2  # the window changes the logits
    one = tiny_model(*WINDOW).generate(prompts(LENGTHS), max_new_tokens=6, return_logits=True)
    _same(ref, {"tokens": [t.tolist() for t in one.tokens], "logits": torch.stack(one.logits)}, "one process")
    cases = [dict(strategy="zigzag", decode="tree", lengths=LENGTHS, steps=6, model=WINDOW),
             dict(strategy="striped", decode="ring", lengths=LENGTHS, steps=6, model=WINDOW)]
    for rank, per_rank in enumerate(run(run_cases, 2, args=(cases,), timeout=180)):
        for case, r in zip(cases, per_rank):
            _same(ref, r, (rank, case["strategy"]))


def test_tensor_parallel_model_generates_like_one_process():
    """Weights split over tp ranks (each holds 1/tp of every projection), the prompt over cp ranks: the same
    tokens and logits as the whole model on one process, with tp > n_kv_heads (shared K/V heads) too."""
    steps = 5
    ref = _reference(LENGTHS, steps)
    cases = [dict(tp=2, strategy="zigzag", decode="tree", lengths=LENGTHS, steps=steps),
             dict(tp=2, strategy="striped", decode="ring", lengths=LENGTHS, steps=steps),
             dict(tp=4, strategy="zigzag", decode="tree", lengths=LENGTHS, steps=steps),  # 2 K/V heads, 4 ranks
             dict(tp=2, group="world", lengths=LENGTHS)]
    for rank, per_rank in enumerate(run(tp_cases, 4, args=(cases,), timeout=180)):
        for case, r in zip(cases[:3], per_rank[:3]):
            _same(ref, r, (rank, case))
            assert r["local_wq"] == (32 // case["tp"], 32)  # this rank holds its heads' rows only
            assert r["tp_bytes"] > 0, (rank, case, r["tp_bytes"])
        # 12 prefill tokens padded so each cp shard splits over tp once more (sequence parallelism)
        assert [r["prompt_len"] for r in per_rank[:3]] == [17, 13, 13]  # cp2 zigzag x tp2 (8 | 16); 4 | 12; 4 | 12
        assert "overlap the model's tensor-parallel ranks" in per_rank[3]["error"]


def test_a_tiny_temperature_samples_the_best_token():
    """Scores are shifted to a best of 0 before dividing by the temperature: 1e-40 is greedy, not NaN; and divided
    in float64, so a temperature below float32's range (1e-320) is not a division by 0."""
    from longctx.model.generate import _pick

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for top_k in (None, 3):
        for temperature in (1e-40, 1e-320):
            got = _pick(logits, temperature, top_k, torch.Generator().manual_seed(1))
            assert torch.equal(got, logits.argmax(-1)), (top_k, temperature)

import json

from longctx.cli import main

KEYS = {"strategy", "world_size", "seq_len", "causal", "dtype", "max_abs_err_out", "max_abs_err_grad",
        "comm_bytes_measured", "comm_bytes_model", "imbalance_counted", "imbalance_model", "fwd_ms", "bwd_ms",
        "single_device_fwd_ms", "single_device_bwd_ms"}


def test_bench_attention_writes_records(tmp_path, capsys):
    path = tmp_path / "out.json"
    main(["bench", "attention", "--world-size", "4", "--seq-len", "64", "--heads", "4", "--kv-heads", "2",
          "--head-dim", "8", "--causal", "--iters", "1", "--warmup", "0", "--json", str(path)])
    printed = capsys.readouterr().out
    records = json.loads(path.read_text())
    assert [r["strategy"] for r in records] == ["ring", "zigzag", "striped", "allgather", "ulysses", "hybrid"]
    for r in records:
        assert KEYS <= set(r)
        assert r["max_abs_err_out"] <= 1e-5 and r["max_abs_err_grad"] <= 1e-5
        assert r["comm_bytes_measured"] == r["comm_bytes_model"] > 0
        assert r["strategy"] in printed
    by = {r["strategy"]: r for r in records}
    # counted from the pairs each rank recorded as it ran; c = 16 tokens per rank, W = 4, causal. Contiguous
    # ring: every step waits for a full c x c block except the diagonal one, so the critical path is
    # c(c+1)/2 + 3c^2 = 904 pairs against an even share of (4 c(c+1)/2 + 6 c^2) / 4 = 520.
    assert by["ring"]["imbalance_counted"] == round(904 / 520, 4)
    assert by["zigzag"]["imbalance_counted"] == 1.0
    assert all(r["imbalance_counted"] == r["imbalance_model"] for r in records)

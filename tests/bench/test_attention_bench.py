import json

from longctx.cli import main

KEYS = {"strategy", "world_size", "seq_len", "causal", "dtype", "max_abs_err_out", "max_abs_err_grad",
        "comm_bytes_measured", "comm_bytes_model", "imbalance", "fwd_ms", "bwd_ms", "single_device_fwd_ms",
        "single_device_bwd_ms"}


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
    assert by["zigzag"]["imbalance"] == 1.0 and by["ring"]["imbalance"] > 1.5

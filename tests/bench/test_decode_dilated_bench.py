import json

from longctx.cli import main


def test_bench_decode_tree_bytes_constant(tmp_path):
    path = tmp_path / "d.json"
    main(["bench", "decode", "--world-size", "4", "--context", "64,256", "--strategies", "tree,ring", "--batch", "2",
          "--heads", "4", "--kv-heads", "2", "--head-dim", "8", "--iters", "1", "--warmup", "0", "--json", str(path)])
    recs = json.loads(path.read_text())
    for r in recs:
        assert {"strategy", "world_size", "context", "max_abs_err", "comm_bytes_measured", "comm_bytes_model",
                "latency_ms"} <= set(r)
        assert r["max_abs_err"] <= 1e-5 and r["comm_bytes_measured"] == r["comm_bytes_model"]
    tree = {r["context"]: r["comm_bytes_measured"] for r in recs if r["strategy"] == "tree"}
    ring = {r["context"]: r["comm_bytes_measured"] for r in recs if r["strategy"] == "ring"}
    assert tree[64] == tree[256] and ring[256] > ring[64]


def test_bench_dilated(tmp_path):
    path = tmp_path / "l.json"
    main(["bench", "dilated", "--world-size", "4", "--seq-len", "128", "--heads", "4", "--head-dim", "8",
          "--segment-lengths", "16,64,128", "--dilation-rates", "1,2,4", "--causal", "--iters", "1", "--warmup", "0",
          "--json", str(path)])
    (r,) = json.loads(path.read_text())
    for key in ("max_abs_err_out", "max_abs_err_grad", "comm_bytes_measured", "comm_bytes_model", "peak_mem_bytes",
                "fwd_ms", "bwd_ms"):
        assert key in r
    assert r["max_abs_err_out"] <= 1e-5 and r["max_abs_err_grad"] <= 1e-5
    assert r["comm_bytes_measured"] == r["comm_bytes_model"] > 0


def test_bench_dilated_check_max_len_0_skips_the_check(tmp_path):
    path = tmp_path / "l.json"
    main(["bench", "dilated", "--world-size", "2", "--seq-len", "32", "--heads", "2", "--head-dim", "8",
          "--segment-lengths", "8,32", "--dilation-rates", "1,2", "--iters", "1", "--warmup", "0",
          "--check-max-len", "0", "--json", str(path)])
    (r,) = json.loads(path.read_text())
    assert r["max_abs_err_out"] is None and r["max_abs_err_grad"] is None  # as --no-check
    assert r["comm_bytes_measured"] == r["comm_bytes_model"] > 0

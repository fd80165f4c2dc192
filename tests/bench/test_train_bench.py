import json
import os

from longctx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_bench_train_compares_layouts(tmp_path, capsys):
    out, png = tmp_path / "train.json", tmp_path / "train.png"
    argv = ["bench", "train", "--config", TINY, "--world-size", "4", "--steps", "2",
            "--layouts", "cp=4,strategy=zigzag", "dp_shard=2,cp=2", "dp_replicate=2,dp_shard=2,cp=1",
            "--overrides", "train.seq_len=512", "train.batch_size=4", "model.dim=32", "model.ffn_dim=64",
            "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "tokens_per_s" in text and "saved_act_bytes_per_rank" in text
    records = json.loads(out.read_text())
    assert [r["layout"] for r in records] == ["cp=4,strategy=zigzag", "dp_shard=2,cp=2",
                                              "dp_replicate=2,dp_shard=2,cp=1"]
    assert [r["engine"] for r in records] == ["ddp", "fsdp", "hsdp"]
    for r in records:
        assert r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 and r["mfu"] == "n/a (cpu)"
        assert r["max_rel_loss_diff"] <= 1e-5  # one config computes the same steps in every layout
        assert len(set(r["saved_act_bytes_by_rank"])) == 1  # balanced layouts: every rank saves as much
    cp4, cp2, cp1 = (r["saved_act_bytes_per_rank"] for r in records)
    # activations scale with the tokens a rank holds: 1 sequence / 4, 2 sequences / 2... per micro-batch
    assert cp4 < cp2 < cp1
    assert png.stat().st_size > 0

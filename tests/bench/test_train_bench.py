import json
import os

import pytest

from longctx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")


def test_bench_train_compares_layouts(tmp_path, capsys):
    out, png = tmp_path / "train.json", tmp_path / "train.png"
    argv = ["bench", "train", "--config", TINY, "--world-size", "4", "--steps", "2",
            "--layouts", "cp=4,strategy=zigzag", "dp_shard=2,cp=2", "dp_replicate=2,dp_shard=2,cp=1",
            "tp=2,pp=2,cp=1,dp_shard=1",
            "--overrides", "train.seq_len=512", "train.batch_size=4", "model.dim=32", "model.ffn_dim=64",
            "--json", str(out), "--plot", str(png)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "tokens_per_s" in text and "saved_act_bytes_per_rank" in text
    records = json.loads(out.read_text())
    assert [r["layout"] for r in records] == ["cp=4,strategy=zigzag", "dp_shard=2,cp=2",
                                              "dp_replicate=2,dp_shard=2,cp=1", "tp=2,pp=2,cp=1,dp_shard=1"]
    assert [r["engine"] for r in records] == ["ddp", "fsdp", "hsdp", "none"]
    assert "tp_bytes" in text and "pp_bytes" in text
    # bytes per axis: each layout moves data exactly on the axes it has
    for r, axes in zip(records, [{"cp", "dp"}, {"cp", "dp"}, {"dp"}, {"tp", "pp"}]):
        assert {a for a in ("tp", "cp", "dp", "pp") if r[f"{a}_bytes"] > 0} == axes, (r["layout"], r)
    for r in records:
        assert r["tokens_per_s"] > 0 and r["flops_per_s"] > 0 and r["mfu"] is None
        assert r["max_rel_loss_diff"] <= 1e-5  # one config computes the same steps in every layout
        if "pp=2" not in r["layout"]:  # pipeline stages differ; the others are balanced
            assert len(set(r["saved_act_bytes_by_rank"])) == 1, r["layout"]
    cp4, cp2, cp1 = (r["saved_act_bytes_per_rank"] for r in records[:3])
    # activations scale with the tokens a rank holds: 1 sequence / 4, 2 sequences / 2... per micro-batch
    assert cp4 < cp2 < cp1
    assert png.stat().st_size > 0


def test_bench_train_defaults_to_every_rank_context_parallel(tmp_path):
    """Without --layouts the one layout is cp over the whole --world-size (it was cp=4 whatever the world)."""
    out = tmp_path / "train.json"
    assert main(["bench", "train", "--config", TINY, "--world-size", "2", "--steps", "1", "--overrides",
                 "train.seq_len=128", "train.batch_size=2", "--json", str(out)]) == 0
    (record,) = json.loads(out.read_text())
    assert record["layout"] == "cp=-1,strategy=zigzag" and record["cp_bytes"] > 0 and record["world_size"] == 2


def test_a_runs_mfu_is_of_the_steps_its_flops_per_s_is(monkeypatch):
    """The summary's MFU is the mean over the timed steps, as its FLOP/s is (it was the last step's)."""
    from types import SimpleNamespace

    from longctx.train import Trainer

    history = [{"loss": 1.0, "tokens": 10, "step_time_s": 1.0, "flops_per_s": f, "mfu": f / 100, "peak_mem_bytes": 0}
               for f in (5.0, 20.0, 30.0, 70.0)]
    trainer = SimpleNamespace(history=history, step=4, run_dir=None, world=1, plan=SimpleNamespace(engine="ddp"),
                              last_checkpoint=None, resumed_from=None, last_validation=None,
                              dims=SimpleNamespace(cp=1, layout=None), stop_signal=None)
    summary = Trainer.summary(trainer, 4.0)
    assert summary["flops_per_s"] == 40.0 and summary["mfu"] == pytest.approx(0.4)  # steps 2-4 (not the warm-up)


def test_packing_bench_counts_and_balances(tmp_path, capsys):
    import json

    from longctx.cli import main

    js, png = tmp_path / "p.json", tmp_path / "p.png"
    assert main(["bench", "packing", "--seq-len", "512", "--world-size", "4", "--batch", "2", "--mean-doc", "32",
                 "--json", str(js), "--plot", str(png)]) == 0
    rows = {r["layout"]: r for r in json.loads(js.read_text())}
    assert rows["striped"]["ring_imbalance"] < 1.05 < rows["contiguous"]["ring_imbalance"]
    assert all(r["rank_imbalance_balanced"] <= r["rank_imbalance"] for r in rows.values())
    assert all(r["work_vs_one_document"] < 1 for r in rows.values()) and png.stat().st_size > 1000
    assert main(["bench", "packing", "--seq-len", "510", "--world-size", "4"]) == 2
    assert "needs a multiple of 8; use 512" in capsys.readouterr().err  # zigzag's 2 x 4, the others' 4


@pytest.mark.parametrize("panels", [1, 2, 3, 4])
def test_bar_plots_put_the_first_row_on_top_and_mark_missing_figures(tmp_path, monkeypatch, panels):
    """Panels share their y axis: inverting each one flipped the order back for every even panel count."""
    import longctx.bench.report as report

    figures = []
    monkeypatch.setattr(report, "save_figure", lambda fig, path: figures.append(fig))
    monkeypatch.setattr("matplotlib.pyplot.close", lambda fig: None)
    labels = ["first", "second", "third"]
    series = {f"panel {i}": [1.0, None, 3.0] for i in range(panels)}
    report.plot_bars(str(tmp_path / "p.png"), labels, series, title="t")
    (fig,) = figures
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == labels  # the others share them
    for ax in fig.axes:
        bottom, top = ax.get_ylim()
        assert bottom > top, panels  # y grows downwards: bar 0 (the first row) is at the top
        assert [p.get_width() for p in ax.patches] == [1.0, 0, 3.0]
        assert [t.get_text().strip() for t in ax.texts] == ["n/a"]  # the missing figure is said, not drawn as 0

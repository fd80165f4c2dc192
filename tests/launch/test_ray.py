"""`longctx launch ray`: Ray Train workers on a Ray instance started in this process compute the same
losses as the simulated cluster; without Ray the error names the extra."""

import json
import os

import pytest

from longctx.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "tiny.yaml")
SMALL = ["train.seq_len=256", "train.steps=3", "train.batch_size=2", "model.dim=32", "model.ffn_dim=64",
         "logging.quiet=true", "logging.tensorboard=false"]


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_ray_train_workers_equal_the_simulated_cluster(tmp_path, capsys):
    pytest.importorskip("ray.train", reason="pip install 'longctx[ray]' (make test installs it)")
    import ray

    assert main(["launch", "local", "--nproc", "2", TINY, *SMALL, f"run_dir={tmp_path / 'local'}"]) == 0
    try:
        assert main(["launch", "ray", "--address", "local", "--num-workers", "2", TINY, *SMALL,
                     f"run_dir={tmp_path / 'ray'}"]) == 0
    finally:
        ray.shutdown()
    assert "done: 3 steps" in capsys.readouterr().out
    local, on_ray = _losses(tmp_path / "local"), _losses(tmp_path / "ray")
    assert len(local) == len(on_ray) == 3
    for a, b in zip(on_ray, local):
        assert abs(a - b) <= 1e-6 * abs(b), (on_ray, local)


def test_launch_ray_errors(tmp_path, capsys, monkeypatch):
    assert main(["launch", "ray", "--num-workers", "3", TINY, *SMALL]) == 2  # tiny's zigzag needs W | seq
    assert "longctx: error:" in capsys.readouterr().err
    assert main(["launch", "slurm", TINY]) == 2
    assert "invalid choice: 'slurm'" in capsys.readouterr().err
    import longctx._optional as optional

    real = optional.importlib.import_module

    def no_ray(name, *a):
        if name.split(".")[0] == "ray":
            raise ImportError("No module named 'ray'")
        return real(name, *a)

    monkeypatch.setattr(optional.importlib, "import_module", no_ray)
    assert main(["launch", "ray", "--num-workers", "2", TINY, *SMALL, f"run_dir={tmp_path}"]) == 2
    assert "install it with: pip install 'longctx[ray]'" in capsys.readouterr().err

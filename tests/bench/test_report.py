"""Where the benchmarks' --json and --plot land: through links and special files, never over each other."""

import json
import os
import threading

import pytest

from longctx._paths import check_distinct, check_plot, figure_path
from longctx.bench import report


def test_json_through_a_symlink_replaces_the_file_it_names_and_keeps_the_link(tmp_path):
    real, link = tmp_path / "real.json", tmp_path / "link.json"
    real.write_text("old")
    link.symlink_to(real)
    report.write_json(str(link), [{"a": 1}])
    assert link.is_symlink() and json.loads(real.read_text()) == [{"a": 1}]
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]  # no temporary file left


def test_json_into_a_pipe_is_written_to_it_not_over_it(tmp_path):
    """/dev/stdout, a FIFO: written through (it used to be renamed over, turning the node into a file)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got = []
    reader = threading.Thread(target=lambda: got.append(open(fifo).read()), daemon=True)
    reader.start()
    report.write_json(str(fifo), [{"b": 2}])
    reader.join(timeout=30)
    assert json.loads(got[0]) == [{"b": 2}]
    assert not os.path.isfile(fifo) and os.path.exists(fifo)  # still the pipe


def test_a_plot_path_is_checked_under_the_name_matplotlib_writes(tmp_path):
    assert figure_path("a.svg") == "a.svg" and figure_path("a") == "a.png" and figure_path("a.") == "a.png"
    (tmp_path / "p.png").mkdir()
    with pytest.raises(ValueError, match=r"--plot .*p\.png is a directory"):
        check_plot(str(tmp_path / "p."))
    with pytest.raises(ValueError, match=r"name the same file \(.*r\.png\): the plot would overwrite the records"):
        check_distinct(str(tmp_path / "r.png"), str(tmp_path / "r"))
    check_distinct(str(tmp_path / "r.json"), str(tmp_path / "r"))  # distinct: no error

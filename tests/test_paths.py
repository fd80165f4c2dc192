"""The bottom-layer path helpers (longctx/_paths.py)."""

import os

import longctx._paths as paths


def _tree(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def _replace_twice(tmp_path):
    new = tmp_path / "new"
    new.mkdir()
    (new / "a").write_text("first")
    paths.replace_dir(str(new), str(tmp_path / "final"))  # nothing there yet: a plain rename
    new.mkdir()
    (new / "b").write_text("second")
    paths.replace_dir(str(new), str(tmp_path / "final"))
    assert sorted(os.listdir(tmp_path)) == ["final"]  # neither the new one's name nor the old one's is left
    assert _tree(tmp_path / "final") == ["b"] and (tmp_path / "final" / "b").read_text() == "second"


def test_replace_dir_swaps_in_one_step_where_the_system_can(tmp_path):
    _replace_twice(tmp_path)


def test_replace_dir_without_an_atomic_exchange_renames_twice(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "exchange", lambda a, b: False)
    _replace_twice(tmp_path)


def test_check_plot_checks_the_file_matplotlib_will_write(tmp_path, monkeypatch):
    import pytest

    (tmp_path / "taken.png").mkdir()  # savefig writes PATH.png for a PATH without an extension
    with pytest.raises(ValueError, match=r"--plot .*taken.png is a directory"):
        paths.check_plot(str(tmp_path / "taken"))
    paths.check_plot(str(tmp_path / "free"))
    # .pgf is typeset by the TeX system matplotlib names: refused up front where it is missing
    monkeypatch.setattr(paths.shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match=r"--plot .*p.pgf: .pgf plots are typeset by xelatex, which is not "
                                         r"installed here; use .pdf or .svg"):
        paths.check_plot(str(tmp_path / "p.pgf"))
    with pytest.raises(ValueError, match="cannot write .foo files") as e:
        paths.check_plot(str(tmp_path / "p.foo"))
    assert ".pgf" not in str(e.value) and ".svg" in str(e.value)  # not offered where it cannot be written
    monkeypatch.setattr(paths.shutil, "which", lambda name: f"/usr/bin/{name}")
    paths.check_plot(str(tmp_path / "p.pgf"))


def test_save_figure_makes_the_directories_and_adds_png(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    assert paths.save_figure(fig, str(tmp_path / "new" / "sub" / "plot")) == str(tmp_path / "new" / "sub" / "plot.png")
    assert paths.save_figure(fig, str(tmp_path / "other" / "p.svg")) == str(tmp_path / "other" / "p.svg")
    plt.close(fig)
    assert _tree(tmp_path) == ["new/sub/plot.png", "other/p.svg"]


def test_a_dangling_link_is_checked_and_written_where_it_leads(tmp_path):
    """--json/--plot naming a link to a path not made yet: checked up front where it leads (a file in the way is
    refused naming the link) and written there, its directories created, the link kept, the format the name says."""
    import json

    import matplotlib
    import pytest

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records, figure = tmp_path / "records.json", tmp_path / "figure.png"
    records.symlink_to(tmp_path / "made" / "r")
    figure.symlink_to(tmp_path / "made" / "f")
    paths.check_output(str(records), "--json")
    paths.check_plot(str(figure))
    paths.write_json(str(records), [{"a": 1}])
    fig = plt.figure()
    assert paths.save_figure(fig, str(figure)) == str(figure)
    plt.close(fig)
    assert records.is_symlink() and figure.is_symlink()
    assert json.loads((tmp_path / "made" / "r").read_text()) == [{"a": 1}]
    assert (tmp_path / "made" / "f").read_bytes().startswith(b"\x89PNG")  # png, as figure.png says
    assert _tree(tmp_path / "made") == ["f", "r"]  # no temporary file left
    (tmp_path / "blocker").write_text("")
    blocked = tmp_path / "blocked.json"
    blocked.symlink_to(tmp_path / "blocker" / "r.json")
    with pytest.raises(ValueError, match=rf"--json {blocked} cannot be created: {tmp_path / 'blocker'} is a file"):
        paths.check_output(str(blocked), "--json")


def test_a_failed_write_names_the_flag_and_leaves_no_partial_file(tmp_path):
    """A result that cannot be written at the end of the work is WriteFailed (one line on the command line)."""
    import matplotlib
    import pytest

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with pytest.raises(paths.WriteFailed, match=r"--json /dev/full: writing failed \(No space left on device\)"):
        paths.write_json("/dev/full", list(range(100_000)))  # a device is written to, not replaced
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro" / "r.json").mkdir()  # the rename onto a directory fails after the records were written
    with pytest.raises(paths.WriteFailed, match=r"--out .*r.json: writing failed"):
        paths.write_json(str(tmp_path / "ro" / "r.json"), [1], what="--out")
    assert os.listdir(tmp_path / "ro") == ["r.json"]  # its temporary file removed
    (tmp_path / "file").write_text("")
    fig = plt.figure()
    with pytest.raises(paths.WriteFailed, match=r"--plot .*file/p.png: writing failed"):
        paths.save_figure(fig, str(tmp_path / "file" / "p.png"))  # a file where its directory would go
    plt.close(fig)

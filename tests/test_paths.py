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

import pytest

from longctx._optional import MissingDependency, require
from longctx.cli import build_parser, info, main


def test_info_lists_backends_and_reasons():
    text = info()
    assert "torch" in text and "kernel backends" in text
    for name in ("reference", "sdpa", "flash"):
        assert name in text
    assert "falls back to reference" in text


def test_main_info(capsys):
    assert main(["info"]) == 0
    assert "longctx" in capsys.readouterr().out


def test_help_lists_benchmarks():
    text = build_parser().format_help()
    assert "bench" in text and "demo" in text and "info" in text


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(MissingDependency, match=r"pip install 'longctx\[flash\]'"):
        require("flash_attn", "flash-attn kernels")
    with pytest.raises(MissingDependency, match="pip install no_such_pkg_xyz"):
        require("no_such_pkg_xyz")

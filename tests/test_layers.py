"""Imports point one way: cli -> demo/bench -> launch -> eval -> train -> data/model -> parallel -> kernels, with
config(_checks), _optional, _signals, _paths, _messages and _argtypes at the bottom. Checked on every import statement,
lazy ones inside functions too."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent / "longctx"
LEVEL = {"config": 0, "config_checks": 0, "_optional": 0, "_signals": 0, "_paths": 0, "_messages": 0, "_argtypes": 0,
         "kernels": 1, "parallel": 2, "model": 3, "data": 3,
         "train": 4, "eval": 5, "launch": 6, "bench": 7, "demo": 8,
         "cli": 9, "cli_data": 9, "cli_errors": 9, "__main__": 10, "__init__": 10}


def _layer(parts):
    return parts[0] if parts else "__init__"


def _imports(path: pathlib.Path):
    rel = path.relative_to(ROOT).with_suffix("").parts
    pkg = list(rel[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = [target] if node.module else [target + [a.name] for a in node.names]
            elif node.module and node.module.startswith("longctx"):
                names = [node.module.split(".")[1:]]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.startswith("longctx.")]
        else:
            continue
        for target in names:
            yield node.lineno, target


def test_no_module_imports_a_higher_layer():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("").parts
        own = LEVEL[_layer(rel)]
        for line, target in _imports(path):
            if target and target[0] in LEVEL and LEVEL[target[0]] > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {'.'.join(target)}")
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports():
    found = dict(_imports(ROOT / "model" / "parallelize.py"))
    assert any(t[:1] == ["parallel"] for t in found.values())

"""The mutant list of `make mutants` stays applicable: each snippet occurs exactly once in its file (a
refactor that moves the code must update the mutant), each names tests that exist, and the list is long
enough. Running the mutants themselves is `make mutants`, not part of this suite."""

import importlib.util
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    spec = importlib.util.spec_from_file_location("mutants", os.path.join(ROOT, "tools", "mutants.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["mutants"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_every_mutant_applies_once_and_names_existing_tests():
    mutants = _load().MUTANTS
    assert len(mutants) >= 13 and len({m.name for m in mutants}) == len(mutants)
    for m in mutants:
        with open(os.path.join(ROOT, m.path)) as f:
            text = f.read()
        assert text.count(m.old) == 1, (m.name, "snippet must occur exactly once")
        assert m.old != m.new and m.tests, m.name
        for t in m.tests:
            path, _, test = t.partition("::")
            with open(os.path.join(ROOT, path)) as f:
                src = f.read()
            name = re.sub(r"\[.*\]$", "", test)
            assert not name or f"def {name}(" in src, (m.name, t)

"""`longctx eval ppl` of one checkpoint on several layouts, and the comparison every such test makes."""

from __future__ import annotations

import json


def ppl_by_layout(main, checkpoint: str, tmp_path, layouts, *argv) -> dict:
    """(nproc, tp) -> the position buckets `eval ppl` wrote, run through `main` (tests/support/cli.py)."""
    got = {}
    for nproc, tp in layouts:
        js = tmp_path / f"p{nproc}tp{tp}.json"
        assert main(["eval", "ppl", "--checkpoint", checkpoint, *argv, "--nproc", str(nproc), "--tp", str(tp),
                     "--json", str(js)]) == 0
        got[nproc, tp] = json.loads(js.read_text())
    return got


def assert_same_ppl(one: list[dict], other: list[dict], tol: float = 1e-5) -> None:
    """The same tokens in every bucket and each bucket's loss within `tol` relative of one process's."""
    assert one[0]["tokens"] > 0
    assert [r["tokens"] for r in one] == [r["tokens"] for r in other]
    for a, b in zip(one, other):
        if a["tokens"] == 0:
            assert a["loss"] is None and b["loss"] is None, (a, b)
        else:
            assert abs(a["loss"] - b["loss"]) <= tol * abs(a["loss"]), (a, b)

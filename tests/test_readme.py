"""The README's Python examples run as written (each block a script, from the repository root): what a reader
copies works."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_every_python_example_runs(tmp_path):
    blocks = _blocks()
    assert len(blocks) >= 3
    for i, code in enumerate(blocks):
        script = tmp_path / f"example_{i}.py"
        script.write_text(code)
        env = dict(os.environ, PYTHONPATH=ROOT)
        done = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, f"README example {i}:\n{code}\n{done.stderr[-3000:]}"

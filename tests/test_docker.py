"""docker/Dockerfile stays correct by reading (no docker engine here): what it copies exists, the extras it
installs are defined, and the commands in its comments and CMD are real longctx commands and configs."""

import os
import re
import subprocess
import sys

import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCKERFILE = os.path.join(ROOT, "docker", "Dockerfile")


def _lines():
    with open(DOCKERFILE) as f:
        return f.read().splitlines()


def test_copied_paths_exist_and_extras_are_defined():
    lines = _lines()
    assert any(line.startswith("FROM nvcr.io/nvidia/pytorch:") for line in lines)
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for src in sources:
            assert os.path.exists(os.path.join(ROOT, src)), src
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        extras = set(tomllib.load(f)["project"]["optional-dependencies"])
    installed = re.search(r"^ARG EXTRAS=([a-z,]+)$", "\n".join(lines), re.M).group(1).split(",")
    assert set(installed) <= extras and {"flash", "ray", "deepspeed", "hf", "data"} <= set(installed)
    # the dependencies install from the metadata alone, before the source is copied (a cached layer), and the
    # package itself after, without dependencies
    first_source = min(i for i, line in enumerate(lines) if line.startswith("COPY longctx"))
    requirements = next(i for i, line in enumerate(lines) if "-r /tmp/requirements.txt" in line)
    assert requirements < first_source and "--no-deps" in "\n".join(lines[first_source:])
    # the requirements the RUN line computes, run here on this pyproject.toml
    code = re.search(r'RUN python -c "(.*?)"\s*\\\n\s*> /tmp/requirements.txt', "\n".join(lines), re.S).group(1)
    code = code.replace("\\\n", "")  # the shell's line continuations inside the double quotes
    printed = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, EXTRAS=",".join(installed)),
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()
    assert "omegaconf>=2.3" in printed and "flash-attn" in printed and "transformers" in printed, printed


def test_the_build_context_leaves_out_the_checkout_s_environment():
    """docker build reads .dockerignore from the root of its context (the repository), not beside the
    Dockerfile: without it the context is the whole checkout, .venv and .git included."""
    with open(os.path.join(ROOT, ".dockerignore")) as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    assert {".venv", ".git", "**/__pycache__"} <= ignored
    assert not os.path.exists(os.path.join(ROOT, "docker", ".dockerignore"))


def test_documented_commands_are_real():
    from longctx.cli import build_parser

    text = "\n".join(_lines())
    for config in re.findall(r"configs/[\w.]+\.yaml", text):
        assert os.path.exists(os.path.join(ROOT, config)), config
    parser = build_parser()
    parser.parse_args(["info"])  # the image's CMD
    m = re.search(r"-m longctx (train \S+)(.*)", text)
    args = [m.group(1).split()[0], m.group(1).split()[1], *m.group(2).split()]
    parsed = parser.parse_args(args)
    assert parsed.command == "train" and all("=" in o for o in parsed.overrides)

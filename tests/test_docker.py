"""docker/Dockerfile stays correct by reading (no docker engine here): what it copies exists, the extras it
installs are defined, and the commands in its comments and CMD are real longctx commands and configs."""

import os
import re

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
    installed = re.search(r'"\.\[([a-z,]+)\]"', "\n".join(lines)).group(1).split(",")
    assert set(installed) <= extras and {"flash", "ray", "deepspeed"} <= set(installed)


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

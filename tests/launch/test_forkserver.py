"""The forkserver imports torch._dynamo, triton and the trainer once for every rank it forks; a launch that sets
a variable those read at import differently (TRITON_INTERPRET) gets ranks started by spawn, which see it."""

import importlib.util

import pytest

from longctx.launch import forkserver, run
from tests.launch import _workers

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="pip install 'longctx[triton]'")


@pytest.mark.timeout(120)
def test_ranks_start_with_the_preloaded_modules_unless_a_launch_changes_what_they_read():
    names = ["torch._dynamo", "triton", "longctx.train.trainer"]
    run(_workers.noop, 1)  # the server is up, started (as in the suite) where TRITON_INTERPRET was unset
    assert "TRITON_INTERPRET" not in forkserver._server_env, "run this test in a session not started under it"
    (before, jit), = run(_workers.imports_and_triton_mode, 1, args=(names,))
    assert before == dict.fromkeys(names, True) and jit == "JITFunction"
    # forked from that server, these ranks' triton could not run a kernel on the CPU: they are spawned
    (before, jit), = run(_workers.imports_and_triton_mode, 1, args=(names,), env={"TRITON_INTERPRET": "1"})
    assert not before["torch._dynamo"] and jit == "InterpretedFunction"


@pytest.mark.timeout(60)
def test_what_importing_torch_dynamo_sets_in_the_caller_keeps_launches_forked(monkeypatch):
    # the caller importing torch._dynamo after the server started sets TORCHINDUCTOR_CACHE_DIR in its environment:
    # not a reason to spawn (it did, for every later launch of the suite)
    run(_workers.noop, 1)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/tmp/elsewhere")
    (before, _), = run(_workers.imports_and_triton_mode, 1, args=(["torch._dynamo"],))
    assert before["torch._dynamo"]


def test_stale_variables_are_those_the_preloaded_modules_read(monkeypatch):
    monkeypatch.setattr(forkserver, "_server_env", {"TRITON_INTERPRET": "0", "TORCHDYNAMO_X": "a", "PATH": "/bin"})
    assert forkserver.stale_variables({"TRITON_INTERPRET": "0", "TORCHDYNAMO_X": "a", "PATH": "/usr/bin"}) == []
    assert forkserver.stale_variables({"TRITON_INTERPRET": "1", "TORCHDYNAMO_X": "a"}) == ["TRITON_INTERPRET"]
    # removed is as stale as changed; a new one too
    assert forkserver.stale_variables({"TORCHDYNAMO_DISABLE": "1"}) == ["TORCHDYNAMO_DISABLE", "TORCHDYNAMO_X",
                                                                       "TRITON_INTERPRET"]
    # what importing torch._dynamo sets, and torch's own variables, are not watched
    assert forkserver.stale_variables({"TRITON_INTERPRET": "0", "TORCHDYNAMO_X": "a", "TORCHINDUCTOR_CACHE_DIR": "/c",
                                       "TORCH_HOME": "/h", "CUDA_VISIBLE_DEVICES": "1"}) == []
    monkeypatch.setattr(forkserver, "_server_env", None)
    assert forkserver.stale_variables({"TRITON_INTERPRET": "1"}) == []  # no server yet: it will start with these


def test_preload_takes_known_modules_before_the_server_starts(monkeypatch):
    monkeypatch.setattr(forkserver, "_requested", [])
    monkeypatch.setattr(forkserver, "_server_env", None)
    with pytest.raises(ValueError, match=r"cannot preload \['numpy'\].*only \['transformers'\]"):
        forkserver.preload("numpy")
    assert forkserver.preload("transformers") and forkserver.modules()[-1] == "transformers"
    monkeypatch.setattr(forkserver, "_requested", [])
    monkeypatch.setattr(forkserver, "_server_env", {})  # running: too late for what it did not import
    assert not forkserver.preload("transformers") and "transformers" not in forkserver.modules()
    assert forkserver.preload("torch._dynamo")

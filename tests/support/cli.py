"""The CLI as the eval and training tests call it.

A command that runs the model in the calling process (`train`, or `eval` / `generate` on one rank) imports
torch._dynamo, and with it triton compiled, which must not happen in the test process before the interpreted
Triton tests run: it runs in a child process. One that only launches ranks (`launch local`, `eval` / `generate`
with --nproc above 1) runs here: its ranks come from the suite's forkserver, where a child would start a
forkserver of its own (seconds of imports) for every command."""

from __future__ import annotations

from longctx.launch import run


def main_here(argv: list[str]) -> int:
    from longctx.cli import main as cli_main

    return cli_main(argv)


def _launches_ranks(argv: list[str]) -> bool:
    if argv[:1] == ["launch"]:
        return True
    if "--nproc" in argv[:-1]:
        value = argv[argv.index("--nproc") + 1]
        return value.isdigit() and int(value) > 1
    return False


def main(argv: list[str]) -> int:
    return main_here(argv) if _launches_ranks(argv) else run(main_here, 1, args=(argv,), timeout=300)[0]

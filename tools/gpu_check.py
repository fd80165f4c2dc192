"""`make gpu-check`: the one prepared script for a lent GPU (about 8 minutes), kept for every later GPU run.

    OUT=/path python tools/gpu_check.py [--budget SECONDS] [--only STEP ...]

Runs from the source tree (`python -m longctx`, PYTHONPATH = the repo) and installs nothing from an index:
the GPU machine has no network. A missing omegaconf is installed with --no-deps --no-index from a wheel in
`.wheels/` (copy ../shared/wheels/*.whl there and carry the folder). Steps:

  info          `longctx info`: versions, devices, kernel backends and why any is unavailable
  kernel-causal `longctx bench kernel` triton, sdpa and torch's flash/efficient/cuDNN, bf16, hd128, causal
  kernel-full   the same without a mask
  virtual-ranks all kernel calls of 8 zigzag ranks on one GPU against one full call, at 16k and 128k
  train-1b-32k  `longctx train configs/gpu_1b_32k.yaml`: a ~1.1B model at 32k context, MFU per step
  tests         pytest tests/kernels (CUDA tensors where a GPU is present) and the GPU training test; after
                the measurements, which check their own outputs, so that slow compiles cannot crowd them out
  softcap       triton with Gemma 2's attention soft-capping (50) against itself uncapped, causal (table in the log)
  latent-widths triton (two widths in its tiles) and sdpa (v zero-padded) at q/k 192, v 128, causal (table in the log)

Without a GPU every step but `info` is skipped with its reason, and the script still exits 0. Every JSON,
PNG and the log go to $OUT (default out/gpu-check), at most 8 files: what the device tool brings back.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = ["--backends", "triton,sdpa,cudnn,torch-flash,torch-efficient,torch-cudnn", "--seq-lens", "1024,4096,16384",
          "--head-dim", "128", "--heads", "16", "--dtype", "bfloat16"]


def _steps(out: str, run_dir: str) -> list[tuple[str, list[str], bool, int]]:
    """(name, argv after `python`, needs a GPU, timeout s)."""
    lc = ["-m", "longctx"]
    return [
        ("info", [*lc, "info"], False, 60),
        ("kernel-causal", [*lc, "bench", "kernel", *KERNEL, "--causal", "--json", f"{out}/kernel_causal.json",
                           "--plot", f"{out}/kernel_causal.png"], True, 100),
        ("kernel-full", [*lc, "bench", "kernel", *KERNEL, "--json", f"{out}/kernel_full.json",
                         "--plot", f"{out}/kernel_full.png"], True, 100),
        # 128k too: at 16k every block call is 1024x2048, too short to keep a GPU busy (5.5x one call on an H200)
        ("virtual-ranks", [*lc, "bench", "kernel", "--backends", "triton,sdpa,cudnn", "--seq-lens", "16384,131072",
                           "--head-dim", "128", "--heads", "16", "--dtype", "bfloat16", "--causal",
                           "--virtual-ranks", "8", "--schedule", "zigzag", "--json", f"{out}/virtual_ranks.json"],
         True, 150),
        ("train-1b-32k", [*lc, "train", "configs/gpu_1b_32k.yaml", f"run_dir={run_dir}"], True, 150),
        # fixed tiles (one test takes the autotuned path itself), compiled by parallel workers where
        # pytest-xdist is installed: a few hundred Triton compiles one after another would take the budget
        # -v: one line per finished test, so a run cut short by its limit still names what failed
        ("tests", ["-m", "pytest", "-v", "--maxfail=15", "-p", "no:cacheprovider", "-p", "no:benchmark",
                   "--durations=10", *_workers(), "tests/kernels", "tests/train/test_gpu.py"], True, 180),
        # last: the cost of the cap's tanh in the tiles is worth knowing, the steps above more
        ("softcap", [*lc, "bench", "kernel", "--backends", "triton", "--seq-lens", "4096,16384", "--head-dim", "128",
                     "--heads", "16", "--dtype", "bfloat16", "--causal", "--softcap", "50"], True, 90),
        ("latent-widths", [*lc, "bench", "kernel", "--backends", "triton,sdpa", "--seq-lens", "4096,16384",
                           "--head-dim", "192", "--v-head-dim", "128", "--heads", "16", "--dtype", "bfloat16",
                           "--causal"], True, 90),
    ]


def _workers() -> list[str]:
    import importlib.util

    return ["-n", "6"] if importlib.util.find_spec("xdist") else []


STEP_ENV = {"tests": {"LONGCTX_TRITON_AUTOTUNE": "0"}}


def _has_gpu(python: str, env: dict) -> str | None:
    """None if torch sees a CUDA GPU, else why not (asked in a child: this script imports no torch)."""
    code = "import torch; print(torch.cuda.is_available() and torch.cuda.device_count())"
    p = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        return f"torch failed to import: {p.stderr.strip().splitlines()[-1] if p.stderr.strip() else p.returncode}"
    return None if p.stdout.strip() not in ("False", "0", "") else "no CUDA GPU visible to torch"


def _ensure_omegaconf(python: str, env: dict, log) -> str | None:
    """Install omegaconf offline from a carried wheel when it is missing, into a folder of its own put on
    env's PYTHONPATH (the GPU machine's site-packages may not be writable); None on success, else why not."""
    p = subprocess.run([python, "-c", "import omegaconf"], capture_output=True, env=env, cwd=ROOT)
    if p.returncode == 0:
        return None
    wheels = sorted(glob.glob(os.path.join(ROOT, ".wheels", "omegaconf-*.whl")) +
                    glob.glob(os.path.join(ROOT, "..", "shared", "wheels", "omegaconf-*.whl")))
    if not wheels:
        return "omegaconf is not installed and no wheel is in .wheels/ (copy ../shared/wheels/*.whl there)"
    site = os.path.join(os.environ.get("TMPDIR", "/tmp"), "longctx-gpu-check-site")
    cmd = [python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation", "--upgrade",
           "--target", site, wheels[-1]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    log(f"$ {' '.join(cmd)}\n{p.stdout}{p.stderr}")
    if p.returncode:
        return f"pip could not install {wheels[-1]}"
    env["PYTHONPATH"] = env["PYTHONPATH"] + os.pathsep + site
    return None


def _metrics(run_dir: str, out: str) -> dict | None:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    shutil.copy(path, os.path.join(out, "train_metrics.jsonl"))
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return rows[-1] if rows else None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for all steps together (default 480)")
    ap.add_argument("--only", nargs="*", help="run only these steps")
    args = ap.parse_args(argv)
    out = os.path.abspath(os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu-check"))
    os.makedirs(out, exist_ok=True)
    run_dir = os.path.join(os.environ.get("TMPDIR", "/tmp"), "longctx-gpu-check-run")
    logf = open(os.path.join(out, "gpu_check.log"), "w")

    def log(text: str) -> None:
        print(text, flush=True)
        logf.write(text + "\n")
        logf.flush()

    python = sys.executable
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    t_start = time.monotonic()
    summary = {"steps": {}, "out": out}
    missing = _ensure_omegaconf(python, env, log)
    shutil.rmtree(run_dir, ignore_errors=True)  # a rerun on the same machine trains afresh
    no_gpu = _has_gpu(python, env)
    steps = _steps(out, run_dir)
    unknown = set(args.only or ()) - {s[0] for s in steps}
    if unknown:
        ap.error(f"unknown step(s) {sorted(unknown)}; choose from {[s[0] for s in steps]}")
    for name, cmd, needs_gpu, timeout in steps:
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.monotonic() - t_start)
        why = (missing if name != "info" else None) or (no_gpu if needs_gpu else None) or \
            (f"time budget: {left:.0f} s left of {args.budget:.0f}" if left < 20 else None)
        if why:
            summary["steps"][name] = {"status": f"skipped: {why}"}
            log(f"== {name}: skipped: {why}")
            continue
        log(f"== {name}: python {' '.join(cmd)}")
        t0 = time.monotonic()
        try:
            p = subprocess.run([python, *cmd], cwd=ROOT, env=dict(env, **STEP_ENV.get(name, {})), capture_output=True,
                               text=True,
                               timeout=min(timeout, left))
            text, rc = p.stdout + p.stderr, p.returncode
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            rc = "timeout"
        took = time.monotonic() - t0
        log(text.rstrip())
        status = "ok" if rc == 0 else f"failed ({'timed out' if rc == 'timeout' else f'exit {rc}'})"
        summary["steps"][name] = {"status": status, "seconds": round(took, 1), "tail": text.strip()[-4000:]}
        if name == "train-1b-32k":
            summary["steps"][name]["last_step"] = _metrics(run_dir, out)
        log(f"== {name}: {status} in {took:.0f} s")
    summary["seconds"] = round(time.monotonic() - t_start, 1)
    with open(os.path.join(out, "gpu_check_summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    log("\nsummary:")
    for name, rec in summary["steps"].items():
        log(f"  {name:14s} {rec['status']}" + (f" ({rec['seconds']} s)" if "seconds" in rec else ""))
    log(f"files in {out}: {sorted(os.listdir(out))}")
    failed = [n for n, r in summary["steps"].items() if r["status"].startswith("failed")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Run every benchmark and write its figures to benchmarks/results/<name>.json (and the printed table to .txt).

    python benchmarks/run_all.py                 # full settings, one fresh process per benchmark (`make bench`)
    python benchmarks/run_all.py --quick         # smoke settings, all in this process (seconds)
    python benchmarks/run_all.py --only padding,memory

Full runs also draw docs/padding.png, docs/memory.png and docs/throughput_breakdown.png. gpu_check needs CUDA:
without it, it is skipped in full runs, and in quick runs its Python part is exercised on the CPU with the tiny
preset.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import subprocess
import sys
import time
import traceback
from pathlib import Path

from _common import DOCS, REPO_ROOT, cuda_available

HERE = Path(__file__).resolve().parent

BENCHMARKS = ("padding", "throughput", "preprocess", "memory", "generate", "gpu_check")


def arguments(name: str, quick: bool, results: Path, cuda: bool) -> list[str] | None:
    """Command-line arguments of one benchmark, or None to skip it."""
    args = ["--json", str(results / f"{name}.json")]
    if quick:
        args.append("--quick")
        if name == "gpu_check":
            args += ["--device", "cuda" if cuda else "cpu", "--checkpointing"]
        return args
    if name == "padding":
        args += ["--plot", str(DOCS / "padding.png")]
    elif name == "memory":
        args += ["--plot", str(DOCS / "memory.png")]
    elif name == "throughput":
        args += ["--breakdown-plot", str(DOCS / "throughput_breakdown.png")]
    elif name == "gpu_check":
        if not cuda:
            return None
        args += ["--device", "cuda", "--preset", "small", "--bf16", "--checkpointing", "--compare-no-checkpointing"]
    return args


def _shown(argument: str) -> str:
    """A path inside the repository relative to its root (as one would type it there), anything else as is."""
    path = Path(argument)
    if path.is_absolute() and path.is_relative_to(REPO_ROOT):
        return str(path.relative_to(REPO_ROOT))
    return argument


def run_in_process(name: str, args: list[str]) -> tuple[bool, str]:
    """Run a benchmark's `main(args)` here, capturing what it prints: (succeeded, output)."""
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            importlib.import_module(name).main(args)
        return True, output.getvalue()
    except BaseException:  # noqa: BLE001  (report and go on with the next benchmark)
        return False, output.getvalue() + traceback.format_exc()


def run_subprocess(name: str, args: list[str]) -> tuple[bool, str]:
    """Run a benchmark script in a fresh process: (succeeded, output, with stderr when it failed)."""
    completed = subprocess.run([sys.executable, str(HERE / f"{name}.py"), *args], capture_output=True, text=True)
    text = completed.stdout + ("\n" + completed.stderr if completed.returncode else "")
    return completed.returncode == 0, text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke settings (seconds each)")
    parser.add_argument("--results", default=str(HERE / "results"), help="folder for <name>.json and <name>.txt")
    parser.add_argument("--only", help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = parser.parse_args(argv)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        parser.error(f"unknown benchmark(s) {sorted(unknown)}; choose from {BENCHMARKS}")
    cuda = cuda_available()

    summary = {}
    for name in names:
        bench_args = arguments(name, args.quick, results, cuda)
        if bench_args is None:
            print(f"== {name}: skipped (needs CUDA; run benchmarks/gpu_check.sh on a GPU machine)\n", flush=True)
            summary[name] = {"status": "skipped", "reason": "no CUDA device"}
            continue
        command = f"python benchmarks/{name}.py {' '.join(_shown(a) for a in bench_args)}"
        print(f"== {name}: {command}", flush=True)
        start = time.perf_counter()
        ok, text = (run_in_process if args.quick else run_subprocess)(name, bench_args)
        seconds = time.perf_counter() - start
        print(text, flush=True)
        (results / f"{name}.txt").write_text(f"$ {command}\n\n{text}")
        summary[name] = {"status": "ok" if ok else "failed", "seconds": round(seconds, 1), "command": command}
        print(f"== {name}: {'ok' if ok else 'FAILED'} in {seconds:.0f} s\n", flush=True)
    (results / "summary.json").write_text(json.dumps({"quick": args.quick, "benchmarks": summary}, indent=2) + "\n")
    failed = [n for n, s in summary.items() if s["status"] == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

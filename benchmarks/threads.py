"""Two cloakonnx jobs on one shared CPU: at the default threads each, and with --threads 1 each.

On a 2-core machine torch's default (one thread per core) in two concurrent processes oversubscribes
the cores, and each run gets many times slower. This runs the same harden twice at once, first
with the default and then with ``--threads 1`` (alternating over --repeats), and prints the wall
time per run and the ratio. Run it alone on the machine: anything else running skews both sides.

    python benchmarks/threads.py --demo-dir /tmp/demo --repeats 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_output_options, cpus, demo_paths, run_main  # noqa: E402


def harden_command(args, out: Path, threads: int | None) -> list[str]:
    model, data, _ = demo_paths(args.demo_dir)
    cmd = [sys.executable, "-m", "cloakonnx", "--quiet", "harden", str(model), "--data", str(data), "--eps",
           str(args.eps), "--score", "absdiff", "--attack", "pgd", "--steps", str(args.steps), "-o", str(out), "--json"]
    return cmd + (["--threads", str(threads)] if threads else [])


def concurrent(args, threads: int | None, tag: str) -> list[float]:
    """Start ``args.jobs`` hardens at once; the wall seconds of each."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "CLOAKONNX_THREADS", "MKL_NUM_THREADS")}
    starts, procs = [], []
    for j in range(args.jobs):
        out = Path(args.work) / f"{tag}_{j}.onnx"
        starts.append(time.perf_counter())
        procs.append(subprocess.Popen(harden_command(args, out, threads), env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    walls = []
    for start, proc in zip(starts, procs):
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"harden failed ({proc.returncode}): {err[-2000:]}")
        walls.append(time.perf_counter() - start)
    return walls


def run(args: argparse.Namespace) -> dict:
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if not demo_paths(args.demo_dir)[0].exists():
        subprocess.run([sys.executable, "-m", "cloakonnx", "--quiet", "demo", "--out", str(args.demo_dir)], check=True,
                       stdout=subprocess.DEVNULL)
    runs = {"default": [], "threads_1": []}
    for r in range(args.repeats):
        order = ("default", "threads_1") if r % 2 == 0 else ("threads_1", "default")
        for name in order:
            runs[name].extend(concurrent(args, None if name == "default" else 1, f"{name}_{r}"))
    median = {k: statistics.median(v) for k, v in runs.items()}
    return {"cores": cpus(), "jobs": args.jobs, "repeats": args.repeats, "runs_seconds": runs,
            "median_seconds": median, "ratio_default_over_threads_1": median["default"] / median["threads_1"]}


def table(result: dict) -> str:
    m = result["median_seconds"]
    return "\n".join([
        f"{result['jobs']} concurrent hardens of the demo model (PGD) on {result['cores']} cores, "
        f"{result['repeats']} alternating repeats",
        f"  default threads:  median {m['default']:.1f} s per run  {result['runs_seconds']['default']}",
        f"  --threads 1 each: median {m['threads_1']:.1f} s per run  {result['runs_seconds']['threads_1']}",
        f"  default / --threads 1: {result['ratio_default_over_threads_1']:.2f}x",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo-dir", type=Path, default=Path("/tmp/cloakonnx-threads/demo"),
                    help="a folder written by `cloakonnx demo` (made if missing) [%(default)s]")
    ap.add_argument("--work", default="/tmp/cloakonnx-threads/out", help="where the hardened models go")
    ap.add_argument("--jobs", type=int, default=2, help="concurrent hardens [%(default)s]")
    ap.add_argument("--repeats", type=int, default=2, help="alternating repeats of each setting [%(default)s]")
    ap.add_argument("--eps", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=20, help="PGD steps (more: a longer attack stage) [%(default)s]")
    add_output_options(ap)
    return run_main(run, ap.parse_args(argv), table)


if __name__ == "__main__":
    raise SystemExit(main())

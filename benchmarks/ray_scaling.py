#!/usr/bin/env python
"""Does ``harden --ray`` scale? Wall time with 2 Ray workers against 1, side by side in one run.

A small CNN (the demo's, 256 features) is trained for a few epochs on scikit-learn's real digits and
exported with torch.onnx, on the digits resized to ``--side`` (default 16: 16x16, where one sample's
attack costs enough that Ray's fixed costs, about 2-3 s per command for starting the workers, do not
dominate). ``--samples`` inputs (default 4,000) are the 1,797 digits repeated with a little noise,
clipped to the box, with their digit labels. Then, on one local Ray instance started
with ``ray.init(num_cpus=<cores>)``, the same ``harden`` (PGD-10, eps 0.1, 5% of features, adaptive
attack on, seed 0) runs with 1 and with 2 workers of one thread each (a worker as a fixed unit of
compute, as one GPU is), alternating over ``--repeats``; the median wall times give the ratio
(target: at most 0.6 on a 2-core machine). Two more runs put it in context: one worker with a thread
per core (what ``--ray-workers 1`` does by default), and no Ray at all, torch and onnxruntime on every
core. Every run must write the same model, byte for byte: the script exits 1 otherwise.

    python benchmarks/ray_scaling.py                   # N=4000, 1 repeat
    python benchmarks/ray_scaling.py --samples 1000 --repeats 3 --json
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from common import add_output_options, cpus, log_to_stderr, run_main


def build(folder: Path, samples: int, seed: int, side: int) -> tuple[Path, Path]:
    """The demo CNN trained briefly on the digits (resized to ``side``), and ``samples`` jittered digits."""
    import torch

    from cloakonnx.data import digits_dataset, split
    from cloakonnx.demo import build_digits_cnn, export_onnx, train_classifier

    digits = digits_dataset(side)
    torch.manual_seed(seed)
    train, _ = split(digits, 0.5, seed=seed)
    net = train_classifier(build_digits_cnn(256), train, epochs=5, seed=seed)
    model = folder / "cnn.onnx"
    export_onnx(net, torch.from_numpy(digits.x[:2]), model)
    rng = np.random.default_rng(seed)
    idx = np.arange(samples) % len(digits)
    x = np.clip(digits.x[idx] + rng.normal(0, 0.02, (samples, *digits.x.shape[1:])), 0, 1).astype(np.float32)
    data = folder / "data.npz"
    np.savez(data, x=x, y=digits.y[idx])
    return model, data


def run_once(model: Path, data: Path, out: Path, workers: int | None, threads: int,
             worker_threads: int | None = None) -> float:
    from cloakonnx.attacks import AttackConfig
    from cloakonnx.config import HardenConfig, RayConfig
    from cloakonnx.harden import harden
    from cloakonnx.runtime import limit_threads

    limit_threads(threads)  # the driver's own work (held-out accuracies) and the run without Ray
    config = HardenConfig(output=out, attack=AttackConfig(name="pgd", eps=0.1, steps=10), fraction=0.05,
                          ray=RayConfig(workers=workers, threads=worker_threads) if workers else None)
    t0 = time.perf_counter()
    harden(model, data, config)
    return time.perf_counter() - t0


def measure(args: argparse.Namespace) -> dict:
    import ray

    log_to_stderr()
    cores = cpus()
    folder = Path(tempfile.mkdtemp(prefix="ray-scaling-"))
    model, data = build(folder, args.samples, args.seed, args.side)
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    runs = {"no ray": (None, None), "ray, 1 worker x 1 thread": (1, 1), "ray, 2 workers x 1 thread": (2, 1),
            f"ray, 1 worker x {cores} threads": (1, cores)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    hashes = set()
    try:
        for r in range(args.repeats):
            order = list(runs) if r % 2 == 0 else list(runs)[::-1]
            for name in order:
                workers, threads = runs[name]
                out = folder / f"{len(times[name])}-{abs(hash(name))}.onnx"
                times[name].append(run_once(model, data, out, workers, cores, threads))
                hashes.add(hashlib.sha256(out.read_bytes()).hexdigest())
    finally:
        ray.shutdown()
    median = {k: statistics.median(v) for k, v in times.items()}
    return {"samples": args.samples, "side": args.side, "cores": cores, "repeats": args.repeats, "attack": "pgd-10, eps 0.1",
            "seconds": median, "all_seconds": times,
            "ratio_2_to_1": median["ray, 2 workers x 1 thread"] / median["ray, 1 worker x 1 thread"],
            "ratio_2_to_1_worker_all_cores": median["ray, 2 workers x 1 thread"] / median[f"ray, 1 worker x {cores} threads"],
            "ratio_2_to_no_ray": median["ray, 2 workers x 1 thread"] / median["no ray"],
            "identical_models": len(hashes) == 1, "target_ratio": 0.6}


def table(r: dict) -> str:
    lines = [f"harden, PGD-10 on {r['samples']} samples of a small CNN at 1x{r['side']}x{r['side']}, "
             f"{r['cores']} cores, median of {r['repeats']} run(s)", "",
             f"{'run':<28} {'wall s':>8}", f"{'-' * 28} {'-' * 8}"]
    lines += [f"{k:<28} {v:>8.1f}" for k, v in r["seconds"].items()]
    verdict = "met" if r["ratio_2_to_1"] <= r["target_ratio"] else "NOT met"
    lines += ["", f"2 workers / 1 worker (1 thread each): {r['ratio_2_to_1']:.2f} (target <= {r['target_ratio']}: "
              f"{verdict})",
              f"2 workers / 1 worker on every core:  {r['ratio_2_to_1_worker_all_cores']:.2f}",
              f"2 workers / no Ray (every core):     {r['ratio_2_to_no_ray']:.2f}",
              f"every run wrote the same model: {'yes' if r['identical_models'] else 'NO'}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--side", type=int, default=16, help="digits resized to SIDE x SIDE (the CNN is size-agnostic)")
    add_output_options(ap, out=True)
    args = ap.parse_args(argv)
    holder: dict = {}

    def measured(a):
        holder.update(measure(a))
        return holder

    code = run_main(measured, args, table)
    return code or (0 if holder.get("identical_models") else 1)


if __name__ == "__main__":
    raise SystemExit(main())

"""Is the attack batch that cloakonnx picks safe? Its memory estimate against the real peak.

cloakonnx sizes attack batches from one measurement: the bytes autograd saves for backward per
sample (``cloakonnx.batching.saved_bytes_per_sample``), times a safety factor of 3, must fit a share
of the free memory. This script checks that estimate on a real architecture (torchvision resnet18
with random weights, exported with torch.onnx and run through cloakonnx's executor): for each
batch size, a fresh subprocess runs one forward+backward to the input and reports how far its
peak memory grew (the process's peak RSS, VmHWM, reset just before, on CPU; ``torch.cuda.max_memory_allocated`` on CUDA). The ratio
``peak / (batch x per-sample estimate)`` must stay below the safety factor.

    python benchmarks/batch_memory.py                       # CPU, 224x224, batches 1,8,32
    python benchmarks/batch_memory.py --device cuda --batches 32,128,512
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

from common import add_output_options, proc_status, reset_peak_rss, resnet18_onnx, run_main


def build(size: int):
    from cloakonnx.torch_exec import OnnxTorchModule

    # the example input is drawn from the seeded generator, and the child's input after it, as before
    return OnnxTorchModule(resnet18_onnx(size, 0, random_example=True))


def child(size: int, batch: int, device: str) -> dict:
    """One forward+backward at ``batch`` in this (fresh) process; peak memory growth in bytes."""
    import gc

    import torch

    module = build(size).to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = proc_status()["VmRSS"]
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(module(x).sum(), x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = proc_status()["VmHWM"] - before
    return {"batch": batch, "peak_growth_bytes": int(peak)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--device", default="cpu")
    add_output_options(ap)
    ap.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], args.child[1], args.device)))
        return 0
    return run_main(run, args, table)


def run(args: argparse.Namespace) -> dict:
    from cloakonnx.batching import BACKWARD_FACTOR, fit_batch, free_memory, saved_bytes_per_sample

    per_sample = saved_bytes_per_sample(build(args.size).to(args.device), (3, args.size, args.size), args.device)
    choice = fit_batch(per_sample, free_memory(args.device), args.device)
    rows = []
    for batch in [int(b) for b in args.batches.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--device", args.device, "--child", str(args.size), str(batch)],
                             capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        r["estimate_bytes"] = batch * per_sample
        r["ratio"] = r["peak_growth_bytes"] / r["estimate_bytes"]
        rows.append(r)
    return {"model": f"resnet18 3x{args.size}x{args.size}", "device": args.device, "per_sample_bytes": per_sample,
            "safety_factor": BACKWARD_FACTOR, "chosen": choice.to_dict(), "runs": rows,
            "verdict": "safe" if all(r["ratio"] < BACKWARD_FACTOR for r in rows) else "UNSAFE"}


def table(result: dict) -> str:
    chosen, factor = result["chosen"], result["safety_factor"]
    lines = [f"{result['model']} on {result['device']}: {result['per_sample_bytes'] / 2**20:.2f} MiB saved for backward "
             "per sample",
             f"chosen attack batch: {chosen['size']} ({chosen['reason']})",
             f"{'batch':>6} {'peak growth MiB':>16} {'estimate MiB':>13} {'peak/estimate':>14}"]
    for r in result["runs"]:
        lines.append(f"{r['batch']:>6} {r['peak_growth_bytes'] / 2**20:>16.1f} {r['estimate_bytes'] / 2**20:>13.1f} "
                     f"{r['ratio']:>14.2f}")
    lines.append(f"every peak/estimate below the safety factor {factor}: {result['verdict']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""How fast are input gradients through the ONNX->torch executor, compared with native torch?

Attacks spend their time in forward+backward passes that only need the gradient with respect
to the input. This script builds torchvision resnet18 (random weights, eval mode), exports it to
ONNX in a temporary folder, loads the export with OnnxTorchModule, and times
``torch.autograd.grad(model(x).sum(), x)`` for the native module and for the executor,
interleaved (native, executor, native, executor, ...) in one process after a warm-up, so drift in
clock speed or machine load hits both alike. Target: median ratio executor/native <= 1.25.

The native module's parameters are frozen (requires_grad=False) because the executor holds
weights as buffers: both compute input gradients only. The default exports fold BatchNorm into
the convolutions, which the native module still runs separately; ``--exporter legacy-unfolded``
keeps BatchNormalization nodes, so both sides run the same kernels and the ratio is the
executor's own overhead.

    python benchmarks/executor_speed.py                       # batch 8, 3x64x64, CPU or CUDA
    python benchmarks/executor_speed.py --batch 32 --size 224 --repeats 30 --json
    python benchmarks/executor_speed.py --exporter dynamo --device cpu --threads 2
    python benchmarks/executor_speed.py --exporter legacy-unfolded   # same kernels on both sides
"""
from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
from pathlib import Path

from common import EXPORTERS, Clock, add_output_options, export_resnet18, run_main

TARGET = 1.25


def input_grad_step(model, x, sync):
    """One attack step's worth of work: forward, backward to the input only. Returns seconds."""
    import torch

    xi = x.detach().requires_grad_(True)
    with Clock() as clock:
        out = model(xi)
        (grad,) = torch.autograd.grad(out.sum(), xi)
        sync()
    del grad
    return clock.wall


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--repeats", type=int, default=20, help="timed forward+backward passes per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--exporter", choices=EXPORTERS, default="legacy")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    add_output_options(p)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    import onnx
    import torch

    from cloakonnx.torch_exec import OnnxTorchModule

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    with tempfile.TemporaryDirectory() as tmp:  # BatchNorm statistics non-trivial, as a trained model would have
        path, native = export_resnet18(Path(tmp), args.size, args.seed, args.exporter, batchnorm_stats=True,
                                       example_batch=2)
        executor = OnnxTorchModule(onnx.load(str(path)))
    native.to(device)
    executor.to(device)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(args.seed)).to(device)

    with torch.no_grad():
        max_abs = float((native(x) - executor(x)).abs().max())

    models = {"native": native, "executor": executor}
    for _ in range(args.warmup):
        for m in models.values():
            input_grad_step(m, x, sync)
    times = {k: [] for k in models}
    for _ in range(args.repeats):  # interleaved: A B A B ...
        for k, m in models.items():
            times[k].append(input_grad_step(m, x, sync))

    med = {k: statistics.median(v) for k, v in times.items()}
    paired = [e / n for n, e in zip(times["native"], times["executor"])]
    return {
        "model": "resnet18 (random weights)",
        "exporter": args.exporter,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "repeats": args.repeats,
        "native_median_ms": round(med["native"] * 1e3, 3),
        "executor_median_ms": round(med["executor"] * 1e3, 3),
        "ratio": round(med["executor"] / med["native"], 4),
        "paired_ratio_median": round(statistics.median(paired), 4),
        "target": TARGET,
        "meets_target": med["executor"] / med["native"] <= TARGET,
        "max_abs_output_diff": max_abs,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def table(r: dict) -> str:
    return "\n".join([
        f"resnet18 forward+backward to the input, batch {r['batch']}, 3x{r['size']}x{r['size']}, "
        f"{r['device']}, {r['threads']} thread(s), {r['exporter']} export, {r['repeats']} interleaved repeats",
        f"  native    median {r['native_median_ms']:9.2f} ms",
        f"  executor  median {r['executor_median_ms']:9.2f} ms",
        f"  ratio executor/native {r['ratio']:.3f} (paired median {r['paired_ratio_median']:.3f}); "
        f"target <= {r['target']}: {'met' if r['meets_target'] else 'NOT met'}",
        f"  max |output difference| {r['max_abs_output_diff']:.2e}",
    ])


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), table)


if __name__ == "__main__":
    sys.exit(main())

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
import json
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

TARGET = 1.25


def build_native(seed: int):
    import torch
    import torchvision

    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial BatchNorm statistics, as a trained model would have
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def export(net, folder: Path, size: int, exporter: str) -> Path:
    import logging

    import torch

    path = folder / f"resnet18-{exporter}.onnx"
    x = torch.zeros(2, 3, size, size)
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "dynamo":
            torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["input"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False)
        else:
            torch.onnx.export(net, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}}, do_constant_folding=exporter == "legacy")
    logging.disable(logging.NOTSET)
    return path


def input_grad_step(model, x, sync):
    """One attack step's worth of work: forward, backward to the input only. Returns seconds."""
    import torch

    xi = x.detach().requires_grad_(True)
    start = time.perf_counter()
    out = model(xi)
    (grad,) = torch.autograd.grad(out.sum(), xi)
    sync()
    elapsed = time.perf_counter() - start
    del grad
    return elapsed


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--repeats", type=int, default=20, help="timed forward+backward passes per model")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--exporter", choices=("legacy", "legacy-unfolded", "dynamo"), default="legacy")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)

    import onnx
    import torch

    from cloakonnx.torch_exec import OnnxTorchModule

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    native = build_native(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        path = export(native, Path(tmp), args.size, args.exporter)
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
    result = {
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
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"resnet18 forward+backward to the input, batch {args.batch}, 3x{args.size}x{args.size}, "
              f"{device}, {result['threads']} thread(s), {args.exporter} export, {args.repeats} interleaved repeats")
        print(f"  native    median {result['native_median_ms']:9.2f} ms")
        print(f"  executor  median {result['executor_median_ms']:9.2f} ms")
        print(f"  ratio executor/native {result['ratio']:.3f} (paired median {result['paired_ratio_median']:.3f}); "
              f"target <= {TARGET}: {'met' if result['meets_target'] else 'NOT met'}")
        print(f"  max |output difference| {max_abs:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Stem input gradients: oneDNN's backward-data kernel against the executor's by phases.

An attack needs the gradient with respect to the image, so every step pays the input gradient of
the stem, the convolution over the image's few channels. For large kernels at a stride, oneDNN's
kernel for it costs several times the forward pass; the executor computes it by phases instead (a
stride-1 convolution of the output gradient and a pixel shuffle, torch_exec/ops/conv.py). For each
stem this script times, alone and interleaved, the forward convolution, torch's input gradient
(``aten.convolution_backward``, as autograd runs it) and the executor's by phases, and checks that
the two gradients agree. 3x3/2 is the control: the executor leaves it to oneDNN.

    python benchmarks/stem_grads.py                           # batch 8, both layouts, one thread
    python benchmarks/stem_grads.py --batch 32 --layouts channels-last --json
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py, also when a test loads this file by path

from common import Clock, add_output_options, run_main  # noqa: E402

# name: (input channels, output channels, kernel, stride, padding, size)
STEMS = {
    "7x7/2 (ResNet)": (3, 64, 7, 2, 3, 224),
    "5x5/2": (3, 64, 5, 2, 2, 224),
    "4x4/4 (ConvNeXt)": (3, 96, 4, 4, 0, 224),
    "16x16/16 (ViT)": (3, 768, 16, 16, 0, 224),
    "3x3/2 (MobileNet), left to oneDNN": (3, 32, 3, 2, 1, 224),
}
LAYOUTS = ("nchw", "channels-last")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=7, help="timed runs of each, interleaved")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated: {', '.join(LAYOUTS)}")
    add_output_options(p)
    args = p.parse_args(argv)
    args.layouts = [name.strip() for name in args.layouts.split(",")]
    if not args.layouts or any(name not in LAYOUTS for name in args.layouts):
        p.error(f"--layouts takes {', '.join(LAYOUTS)}")
    return args


def time_stem(stem, batch: int, layout, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    from cloakonnx.torch_exec.ops.conv import _input_grad_by_phases

    c_in, c_out, k, s, p, size = stem
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, c_in, size, size, generator=gen).contiguous(memory_format=layout)
    w = torch.randn(c_out, c_in, k, k, generator=gen).contiguous(memory_format=layout)
    grad = torch.randn_like(F.conv2d(x, w, None, s, p))
    runs = {
        "forward": lambda: F.conv2d(x, w, None, s, p),
        "oneDNN": lambda: torch.ops.aten.convolution_backward(grad, x, w, None, [s, s], [p, p], [1, 1], False,
                                                              [0, 0], 1, [True, False, False])[0],
        "phases": lambda: _input_grad_by_phases(grad, x.shape, layout, w, s, [p, p]),
    }
    want = runs["oneDNN"]()
    diff = float((runs["phases"]() - want).abs().max() / want.abs().max())  # relative to the largest entry
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            with Clock() as clock:
                run()
            times[name].append(clock.wall)
    ms = {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
    return {"median_ms": ms, "phases_over_onednn": round(ms["phases"] / ms["oneDNN"], 3),
            "onednn_over_forward": round(ms["oneDNN"] / ms["forward"], 2), "max_relative_grad_difference": diff}


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    formats = {"nchw": torch.contiguous_format, "channels-last": torch.channels_last}
    rows = [{"stem": name, "layout": layout, **time_stem(stem, args.batch, formats[layout], args.repeats)}
            for layout in args.layouts for name, stem in STEMS.items()]
    return {"batch": args.batch, "threads": args.threads, "repeats": args.repeats, "rows": rows,
            "torch": torch.__version__}


def table(r: dict) -> str:
    lines = [f"stem input gradients, batch {r['batch']}, 224x224, {r['threads']} thread(s), median of {r['repeats']}",
             f"  {'stem':36s} {'layout':14s} {'forward':>9s} {'oneDNN':>9s} {'phases':>9s}  phases/oneDNN  max rel. diff"]
    for row in r["rows"]:
        ms = row["median_ms"]
        lines.append(f"  {row['stem']:36s} {row['layout']:14s} {ms['forward']:9.2f} {ms['oneDNN']:9.2f} "
                     f"{ms['phases']:9.2f}  {row['phases_over_onednn']:13.2f}  {row['max_relative_grad_difference']:.1e}")
    return "\n".join(lines)


def main(argv=None) -> int:
    return run_main(run, parse_args(argv), table)


if __name__ == "__main__":
    sys.exit(main())

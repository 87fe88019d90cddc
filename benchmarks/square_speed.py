"""Square Attack speed: its search on one torch thread against the caller's thread count.

Square queries the model through onnxruntime once per iteration and does a dozen tiny tensor ops
in between. This script runs the same attack (same seed, so the same adversarial images, which it
checks) with ``Square.search_threads = 1`` (the default) and ``None`` (torch's own thread count),
interleaved, on two models: the demo's digits CNN (8x8) and a torchvision resnet18 with random
weights at 3x64x64. It prints median seconds and the ratio.

    python benchmarks/square_speed.py --demo-dir cloakonnx-demo --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from common import Clock, demo_paths, resnet18_onnx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo-dir", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--queries", type=int, default=300)
    args = ap.parse_args(argv)

    import onnx
    import torch

    from cloakonnx.attacks import AttackConfig
    from cloakonnx.backend import craft
    from cloakonnx.attacks.square import Square
    from cloakonnx.data import Preprocess
    from cloakonnx.runner import Runner

    model_path, _, test_path = demo_paths(args.demo_dir)
    test = np.load(test_path)
    rng = np.random.default_rng(0)
    cases = [("digits CNN 1x8x8, 200 images", onnx.load(str(model_path)), test["x"][:200],
              test["y"][:200].astype(np.int64))]
    resnet = resnet18_onnx(64, 0, num_classes=10, random_example=True)
    x = rng.random((32, 3, 64, 64), dtype=np.float32)
    runner = Runner(resnet, "logits", [], Preprocess(), providers=["CPUExecutionProvider"])
    y = runner.session.run(None, {"input": x})[0].argmax(1).astype(np.int64)  # attack the model's own labels
    cases.append(("resnet18 3x64x64, 32 images", resnet, x, y))
    print(f"torch threads: {torch.get_num_threads()}; Square L-inf eps 0.1, {args.queries} queries, "
          f"{args.repeats} interleaved repeats")
    for label, model, x, y in cases:
        runner = Runner(model, "logits", [], Preprocess(), providers=["CPUExecutionProvider"])
        cfg = AttackConfig(name="square", eps=0.1, queries=args.queries, seed=0)
        times: dict[str, list[float]] = {"one thread": [], "caller's": []}
        outs = {}
        for _ in range(args.repeats):
            for name, threads in (("one thread", 1), ("caller's", None)):
                Square.search_threads = threads
                with Clock() as clock:
                    outs[name] = craft(runner.model_for("square"), cfg, x, y, (0.0, 1.0), "cpu", "square", 128)
                times[name].append(clock.wall)
        Square.search_threads = 1
        same = np.array_equal(outs["one thread"], outs["caller's"])
        a, b = statistics.median(times["one thread"]), statistics.median(times["caller's"])
        print(f"{label}: one thread {a:.2f} s, caller's threads {b:.2f} s, ratio {a / b:.3f}; "
              f"identical adversarial images: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""``evaluate --preset standard`` against torchattacks' AutoAttack(version='standard'): same samples,
same threads, one run, side by side.

A CNN is trained on half of scikit-learn's real digits (the demo's recipe) and exported with
torch.onnx. cloakonnx evaluates the ONNX file through its executor and onnxruntime; torchattacks
attacks the native torch module. Both run APGD-CE, APGD-T, FAB-T and Square-5000 at the same eps on
the same held-out samples. The script prints both robust accuracies (they should agree within about
a point: the attacks' random starts differ) and the wall-time ratio cloakonnx / torchattacks
(target: at most 1.2).

    python benchmarks/autoattack_speed.py --samples 500 --eps 0.1
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import Clock, add_output_options, log_to_stderr, run_main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500, help="held-out digits evaluated [500]")
    ap.add_argument("--eps", type=float, default=0.1, help="L-inf budget [0.1]")
    ap.add_argument("--epochs", type=int, default=15, help="training epochs of the digits CNN [15]")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both [1]")
    ap.add_argument("--seed", type=int, default=0)
    add_output_options(ap)
    return ap.parse_args(argv)


def run(args) -> dict:
    import numpy as np
    import torch
    import torchattacks

    from cloakonnx.config import EvaluateConfig
    from cloakonnx.data import Dataset, digits_dataset, split
    from cloakonnx.demo import build_digits_cnn, export_onnx, train_classifier
    from cloakonnx.evaluate import evaluate

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, held = split(digits_dataset(), 0.5, args.seed)
    net = train_classifier(build_digits_cnn(), train, args.epochs, args.seed).eval()
    x, y = held.x[: args.samples], held.y[: args.samples]
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits_cnn.onnx"
        export_onnx(net, torch.from_numpy(x[:2]), path)
        config = EvaluateConfig(preset="standard", eps=(args.eps,), seed=args.seed, sanity=False, device="cpu",
                                providers=("CPUExecutionProvider",))
        with Clock() as ours_clock:
            ours = evaluate(path, Dataset(x, y), config)
    attack = torchattacks.AutoAttack(net, norm="Linf", eps=args.eps, version="standard", n_classes=10,
                                     seed=args.seed)
    with Clock() as theirs_clock:
        adv = attack(torch.from_numpy(x), torch.from_numpy(y))
    with torch.no_grad():
        theirs = float((net(adv).argmax(1).numpy() == y).mean())
        clean = float((net(torch.from_numpy(x)).argmax(1).numpy() == y).mean())
    return {"samples": len(y), "eps": args.eps, "threads": args.threads, "clean_accuracy": clean,
            "cloakonnx": {"robust_accuracy": ours.robust_accuracy[repr(args.eps)], "seconds": ours_clock.wall,
                          "per_attack": {r["attack"]: r["accuracy"] for r in ours.results}},
            "torchattacks": {"robust_accuracy": theirs, "seconds": theirs_clock.wall},
            "ratio": ours_clock.wall / theirs_clock.wall,
            "difference_points": 100 * (ours.robust_accuracy[repr(args.eps)] - theirs),
            "agreement": bool(np.isclose(ours.robust_accuracy[repr(args.eps)], theirs, atol=0.01)
                              or ours.robust_accuracy[repr(args.eps)] < theirs)}


def table(r: dict) -> str:
    ours, theirs = r["cloakonnx"], r["torchattacks"]
    return "\n".join([
        f"AutoAttack standard, L-inf eps {r['eps']:g}, {r['samples']} held-out digits, {r['threads']} torch "
        f"thread(s); clean {100 * r['clean_accuracy']:.2f}%",
        f"  cloakonnx evaluate --preset standard (ONNX): robust {100 * ours['robust_accuracy']:.2f}% in "
        f"{ours['seconds']:.1f} s  ({', '.join(f'{k} {100 * v:.2f}%' for k, v in ours['per_attack'].items())})",
        f"  torchattacks AutoAttack (native torch):      robust {100 * theirs['robust_accuracy']:.2f}% in "
        f"{theirs['seconds']:.1f} s",
        f"  difference {r['difference_points']:+.2f} points (within 1 point, or below: "
        f"{'yes' if r['agreement'] else 'NO'}); time ratio cloakonnx / torchattacks {r['ratio']:.2f} "
        f"(target <= 1.2: {'met' if r['ratio'] <= 1.2 else 'NOT met'})",
    ])


def main(argv=None) -> int:
    log_to_stderr()
    return run_main(run, parse_args(argv), table)


if __name__ == "__main__":
    raise SystemExit(main())

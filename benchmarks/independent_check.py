"""Harden a classifier cloakonnx's tests never built, and check the report against an independent
evaluation.

This script:

1. trains a LeNet-style CNN (Tanh, AvgPool, a three-layer MLP head) on 16x16 upsampled
   scikit-learn digits;
2. exports it with torch.onnx's dynamo exporter (opset 20);
3. runs the `cloakonnx harden` CLI on the .onnx and .npz alone;
4. recomputes the report's numbers independently: clean accuracy with plain onnxruntime, and the
   original's PGD accuracy with torchattacks on the native torch module.

    python benchmarks/independent_check.py [--out DIR] [-- extra harden options]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def lenet():
    import torch.nn as nn

    return nn.Sequential(nn.Conv2d(1, 16, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(16, 32, 3), nn.ReLU(),
                         nn.Flatten(), nn.Linear(32 * 6 * 6, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
                         nn.Linear(84, 10))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("harden_args", nargs="*", help="extra options for cloakonnx harden (after --)")
    args = ap.parse_args(argv)
    import onnx
    import onnxruntime as ort
    import torch
    import torch.nn.functional as F
    import torchattacks
    from sklearn.datasets import load_digits

    out = args.out or Path(tempfile.mkdtemp(prefix="cloakonnx-independent-"))
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1)
    d = load_digits()
    x = F.interpolate(torch.from_numpy((d.images / 16.0).astype(np.float32))[:, None], size=(16, 16),
                      mode="bilinear", align_corners=False).clamp(0, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(7))
    train, rest = perm[:1200], perm[1200:]
    net = lenet()
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    for _ in range(25):
        for i in range(0, len(train), 50):
            idx = train[i : i + 50]
            opt.zero_grad()
            F.cross_entropy(net(x[idx]), y[idx]).backward()
            opt.step()
    net.eval()
    model, data, report_path = out / "lenet.onnx", out / "digits16.npz", out / "report.json"
    torch.onnx.export(net, (x[:2],), str(model), input_names=["image"], output_names=["scores"],
                      dynamic_shapes=({0: torch.export.Dim("n")},))
    np.savez(data, x=x[rest].numpy(), y=y[rest].numpy())

    cmd = [sys.executable, "-m", "cloakonnx.cli", "-q", "harden", str(model), "--data", str(data),
           "-o", str(out / "lenet.cloaked.onnx"), "--eps", "0.1", "--fraction", "0.05", "--report", str(report_path),
           *args.harden_args]
    print("$", " ".join(cmd[2:]))
    subprocess.run(cmd, check=True)
    rep = json.loads(report_path.read_text())

    # the same validation split harden used (seed 0, --val-split 0.2), recomputed here by hand
    n = len(rest)
    val = np.sort(np.random.default_rng(rep["seed"]).permutation(n)[: int(round(n * 0.2))])
    xv, yv = x[rest].numpy()[val], y[rest].numpy()[val]

    def ort_acc(path, inputs):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return float((sess.run(None, {"image": inputs})[0].argmax(1) == yv).mean())

    a = rep["attack"]
    atk = torchattacks.PGD(net, eps=a["eps"], alpha=a["step_size"], steps=a["steps"], random_start=True)
    adv = atk(torch.from_numpy(xv), torch.from_numpy(yv)).numpy()
    onnx.checker.check_model(rep["output"])
    rows = [("clean, original", rep["clean_accuracy"]["original"], ort_acc(model, xv)),
            ("clean, hardened", rep["clean_accuracy"]["hardened"], ort_acc(rep["output"], xv)),
            ("PGD, original (torchattacks)", rep["adversarial_accuracy"]["original"], ort_acc(model, adv))]
    print(f"{'':32} {'report':>8} {'independent':>12}")
    for name, ours, theirs in rows:
        print(f"{name:32} {100 * ours:7.2f}% {100 * theirs:11.2f}%")
    print("hardened model passes onnx.checker; files in", out)
    ok = abs(rows[0][1] - rows[0][2]) < 1e-9 and abs(rows[1][1] - rows[1][2]) < 1e-9 and abs(rows[2][1] - rows[2][2]) <= 0.02
    print("agreement:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

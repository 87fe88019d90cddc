"""The embedded default: a small CNN trained on scikit-learn's real handwritten digits, hardened end to end.

Everything is local: the digits ship inside scikit-learn, the model is trained here in seconds,
exported with torch.onnx, and then goes through the same ``harden`` a user's model goes through.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .data import Dataset, digits_dataset

log = logging.getLogger(__name__)

PAPER_FRACTION = 0.05  # the demo's paper mask: 5% of the head's input features, as DeepCloak masks


@dataclass
class DemoOptions:
    out: Path = Path("cloakonnx-demo")
    epochs: int = 15
    seed: int = 0
    features: int = 256
    threads: int | None = None  # torch and onnxruntime threads; None: $CLOAKONNX_THREADS, else the usable cores


def build_digits_cnn(features: int = 256):
    """A global-average-pool CNN for 1x8x8 digits; ``features`` is the width of the head's input."""
    import torch.nn as nn

    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, features, 3, padding=1), nn.BatchNorm2d(features), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(features, 10),
    )


def train_classifier(model, data: Dataset, epochs: int, seed: int, lr: float = 3e-3, batch_size: int = 64):
    """Plain Adam training on all of ``data``; deterministic for a given seed on one machine."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    from tqdm.auto import tqdm

    model.train()
    for _ in tqdm(range(epochs), desc="training", unit="epoch", leave=False, disable=None):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), batch_size):
            idx = perm[i : i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        sched.step()
    model.eval()
    return model


def export_onnx(model, example, path: Path, dynamic_batch: bool = True) -> None:
    """torch.onnx export (legacy TorchScript exporter, opset 17) with a dynamic batch dimension."""
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model, (example,), str(path), input_names=["input"], output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None,
            opset_version=17, dynamo=False,
        )


@dataclass
class DemoResult:
    model: Path
    data: Path
    test_data: Path
    test_accuracy: float
    train_seconds: float
    report: dict  # harden's default: fine-tuned weights (learned masks when those gain nothing)
    paper: dict  # the paper's mask on the same data, for comparison


def run_demo(options: DemoOptions):
    """Train, export, write data, harden with the default (fine-tuned weights; learned masks when
    those gain nothing) and with the paper's mask: the whole job on real digits, in about a minute."""
    import time

    import torch

    from .attacks import AttackConfig
    from .data import split
    from .harden import HardenConfig, harden

    from .runtime import use_threads

    use_threads(options.threads)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(options.seed)
    digits = digits_dataset()
    # Three disjoint parts: training (40%), hardening (40%: calibration + validation) and a test set for
    # `evaluate` (20%). Hardening gets as much as training: a 1-point clean budget held with a 90%
    # confidence bound needs a few hundred validation samples (cloakonnx.curve.validation_needed).
    train, held_out = split(digits, 0.6, options.seed)
    harden_data, test = split(held_out, 1 / 3, options.seed)
    t = time.perf_counter()
    log.info("training a %d-feature CNN on %d real digits (scikit-learn) for %d epochs", options.features,
             len(train), options.epochs)
    net = train_classifier(build_digits_cnn(options.features), train, options.epochs, options.seed)
    train_seconds = time.perf_counter() - t
    with torch.no_grad():
        acc = float((net(torch.from_numpy(held_out.x)).argmax(1).numpy() == held_out.y).mean())
    model_path, data_path, test_path = out / "digits_cnn.onnx", out / "digits.npz", out / "test.npz"
    export_onnx(net, torch.from_numpy(held_out.x[:2]), model_path)
    np.savez(data_path, x=harden_data.x, y=harden_data.y)
    np.savez(test_path, x=test.x, y=test.y)
    log.info("trained in %.1f s, held-out accuracy %.2f%%; wrote %s, %s (for harden) and %s (for evaluate)",
             train_seconds, 100 * acc, model_path, data_path, test_path)
    attack = AttackConfig(name="pgd", eps=0.1, steps=10, seed=options.seed)
    report = harden(model_path, data_path, HardenConfig(output=out / "digits_cnn.cloaked.onnx", attack=attack,
                                                        seed=options.seed, threads=options.threads))
    log.info("for comparison, the paper's mask: %.0f%% of the head's input features by --score absdiff",
             100 * PAPER_FRACTION)
    paper = harden(model_path, data_path, HardenConfig(
        output=out / "digits_cnn.paper.onnx", attack=attack, score="absdiff", fraction=PAPER_FRACTION,
        val_split=report.samples["validation"] / len(harden_data), seed=options.seed, threads=options.threads))
    return DemoResult(model_path, data_path, test_path, acc, train_seconds, report.to_dict(), paper.to_dict())

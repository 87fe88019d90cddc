"""Shared by the benchmarks that measure on a model, its hardening data and a held-out test set:
either the folder ``cloakonnx demo`` wrote, or three explicit paths."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_model_options(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--demo-dir", type=Path, help="folder written by `cloakonnx demo` (model, digits.npz, test.npz)")
    ap.add_argument("--model", type=Path)
    ap.add_argument("--data", type=Path, help="data for harden (split into calibration and validation)")
    ap.add_argument("--test", type=Path, help="held-out data neither training nor hardening saw")


def resolve_model_options(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Fill --model/--data/--test from --demo-dir where not given; exit with usage if any is missing."""
    if args.demo_dir:
        args.model = args.model or args.demo_dir / "digits_cnn.onnx"
        args.data = args.data or args.demo_dir / "digits.npz"
        args.test = args.test or args.demo_dir / "test.npz"
    if not (args.model and args.data and args.test):
        ap.error("give --demo-dir, or --model, --data and --test")

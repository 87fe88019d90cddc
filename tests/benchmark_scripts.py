"""Benchmark scripts imported as modules in tests (they are scripts in benchmarks/, not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name: str):
    """benchmarks/<name>.py as a module; its folder goes on sys.path so that it finds common.py and the others."""
    spec = importlib.util.spec_from_file_location(f"cloakonnx_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(BENCHMARKS))
    spec.loader.exec_module(module)
    return module

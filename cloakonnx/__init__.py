"""cloakonnx: harden ONNX image classifiers against adversarial inputs with a DeepCloak feature mask.

Public API (heavy modules load on first use, so ``import cloakonnx`` and ``cloakonnx --help`` stay fast)::

    from cloakonnx import harden, sweep, evaluate, check_model, inspect_model, CloakError
    from cloakonnx import HardenConfig, MaskConfig, EvaluateConfig, AttackConfig, Preprocess
"""
from __future__ import annotations

import importlib

from .errors import CloakError

__version__ = "0.1.0"

_LAZY = {
    "harden": "harden",
    "HardenReport": "harden",
    "HardenConfig": "config",
    "MaskConfig": "config",
    "EvaluateConfig": "config",
    "sweep": "sweep",
    "SweepReport": "sweep",
    "evaluate": "evaluate",
    "EvaluateReport": "evaluate",
    "check_model": "check",
    "run_demo": "demo",
    "DemoOptions": "demo",
    "inspect_model": "graph",
    "load_model": "graph",
    "find_head": "graph",
    "apply_mask": "graph",
    "fold_mask": "graph",
    "AttackConfig": "attacks",
    "Preprocess": "data",
    "Dataset": "data",
}

__all__ = ["CloakError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cloakonnx' has no attribute {name!r}")

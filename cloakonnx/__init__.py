"""cloakonnx: harden ONNX image classifiers against adversarial inputs with a DeepCloak feature mask.

Public API (heavy modules load on first use, so ``import cloakonnx`` and ``cloakonnx --help`` stay fast)::

    from cloakonnx import harden, HardenConfig, AttackConfig, inspect_model, CloakError
"""
from __future__ import annotations

import importlib

from .errors import CloakError

__version__ = "0.1.0"

_LAZY = {
    "harden": "harden",
    "HardenConfig": "harden",
    "HardenReport": "harden",
    "inspect_model": "model",
    "load_model": "model",
    "find_head": "model",
    "AttackConfig": "attacks",
    "Preprocess": "data",
    "Dataset": "data",
    "apply_mask": "surgery",
    "fold_mask": "fold",
    "evaluate": "evaluate",
    "EvaluateConfig": "evaluate",
    "sweep": "sweep",
    "check_model": "check",
    "run_demo": "demo",
    "DemoOptions": "demo",
}

__all__ = ["CloakError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'cloakonnx' has no attribute {name!r}")

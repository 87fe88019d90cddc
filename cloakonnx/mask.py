"""Feature scores and mask selection.

The DeepCloak score of feature j is mean |c(x')_j - c(x)_j| over the calibration set: how far
adversarial noise moves it. The mask zeroes the highest-scoring features.
"""
from __future__ import annotations

import numpy as np

from .errors import CloakError
from .stats import FeatureStats


def _absdiff(stats: FeatureStats) -> np.ndarray:
    return stats.mean_absdiff()


def _normalised(stats: FeatureStats) -> np.ndarray:
    """absdiff relative to the feature's clean spread: noise that a feature's normal variation does not explain."""
    return stats.mean_absdiff() / (stats.clean_std() + 1e-8 * max(float(stats.clean_std().max()), 1e-12))


def _margin(stats: FeatureStats) -> np.ndarray:
    """How much the feature's adversarial shift, weighted by the head, pushed the true class's margin
    towards the adversarial class: mean of (f'_j - f_j) * (W[j, adv] - W[j, true])."""
    if stats.sum_margin is None:
        raise CloakError("the margin score needs a linear head after the feature tensor (not a custom --feature-tensor)")
    return stats.sum_margin / max(stats.count, 1)


DEFAULT_FRACTION = 0.01  # of features masked by the statistical scores when no fraction or budget is given
SCORES = {"absdiff": _absdiff, "normalised": _normalised, "margin": _margin}


def score_features(stats: FeatureStats, method: str = "absdiff") -> np.ndarray:
    try:
        fn = SCORES[method]
    except KeyError:
        raise CloakError(f"unknown score {method!r}; choose one of {', '.join(SCORES)}") from None
    return fn(stats)


def count_for(fraction: float, width: int) -> int:
    """Number of features a fraction masks: rounded, and at least one when the fraction is positive."""
    if not 0 <= fraction < 1:
        raise CloakError(f"--fraction must be in [0, 1), got {fraction:g}")
    return 0 if fraction == 0 else max(1, int(round(fraction * width)))


def base_mask(width: int, existing: np.ndarray | None = None) -> np.ndarray:
    """All ones, or the 0/1 version of an existing mask."""
    keep = np.ones(width, np.float32) if existing is None else (np.asarray(existing).reshape(-1) != 0).astype(np.float32)
    if len(keep) != width:
        raise CloakError(f"existing mask has {len(keep)} entries but the feature tensor has {width}")
    return keep


def ranking(scores: np.ndarray, existing: np.ndarray | None = None) -> np.ndarray:
    """Indices of the features not yet masked, highest score first (ties: lower index first)."""
    candidates = np.flatnonzero(base_mask(len(scores), existing))
    return candidates[np.argsort(-scores[candidates], kind="stable")]


def mask_top(order: np.ndarray, k: int, width: int, existing: np.ndarray | None = None) -> np.ndarray:
    """The existing mask (its soft values kept) with the first ``k`` features of ``order`` zeroed as well."""
    base_mask(width, existing)  # checks the width
    keep = np.ones(width, np.float32) if existing is None else np.asarray(existing, np.float32).reshape(-1).copy()
    keep[order[:k]] = 0.0
    return keep

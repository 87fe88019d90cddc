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


SCORES = {"absdiff": _absdiff, "normalised": _normalised}


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


def select_mask(scores: np.ndarray, fraction: float, existing: np.ndarray | None = None) -> np.ndarray:
    """A 0/1 float32 mask zeroing the top ``fraction`` of features by score.

    Features an existing mask already zeroes stay zero and are not counted again: the result's zeros
    are the union of the old ones and the newly chosen ones.
    """
    width = len(scores)
    k = count_for(fraction, width)
    keep = np.ones(width, np.float32) if existing is None else (np.asarray(existing).reshape(-1) != 0).astype(np.float32)
    if len(keep) != width:
        raise CloakError(f"existing mask has {len(keep)} entries but the feature tensor has {width}")
    candidates = np.flatnonzero(keep)
    order = candidates[np.argsort(-scores[candidates], kind="stable")]
    keep[order[:k]] = 0.0
    return keep

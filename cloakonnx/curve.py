"""The trade-off curve, in numpy: clean and adversarial accuracy against the share of features
masked, and the choice of a point under a clean-accuracy budget.

Validation features are computed once through onnxruntime; each candidate mask is then applied to
them and the head is run in numpy, instead of re-running the whole model per fraction.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .graph import Head
from .mask import mask_top

DEFAULT_FRACTIONS = (0.0, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.125, 0.15,
                     0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)


@dataclass
class CurvePoint:
    fraction: float  # of all features, zeroed in total (earlier masks included)
    masked: int  # zeroed in total
    added: int  # zeroed by this run
    clean_accuracy: float
    adversarial_accuracy: float
    # One-sided upper confidence bound on the clean-accuracy drop in points, from the paired
    # per-sample changes against no new mask (see clean_drop_bound); None if not computed.
    clean_drop_bound: float | None = None

    @property
    def size(self) -> int:
        """What the choice prefers less of, among equally good points: the features this run zeroes."""
        return self.added

    def to_dict(self) -> dict:
        return asdict(self)


def counts_for(fractions, width: int, already: int = 0) -> list[int]:
    """Distinct numbers of new features to mask for the candidate fractions (of the whole width)."""
    free = width - already
    out = sorted({min(free, max(0, int(round(f * width)) - already)) for f in fractions} | {0})
    return out


def clean_drop_bound(correct_before: np.ndarray, correct_after: np.ndarray, confidence: float) -> float:
    """Upper bound, in percentage points, on the clean-accuracy drop a mask causes on new data.

    A paired comparison: b samples the mask broke, f it fixed, out of n. The bound is the one-sided
    Agresti-Min interval for a difference of matched proportions (Agresti and Min, 2005): add 0.5
    to each cell of the 2x2 table, then the Wald bound. Unlike the plain Wald bound it is not zero
    when no sample changed, so a small validation split cannot certify a tight budget by luck.
    """
    from statistics import NormalDist

    if np.array_equal(correct_before, correct_after) and len(correct_before) == 0:
        return 0.0
    b = float(np.sum(correct_before & ~correct_after)) + 0.5
    f = float(np.sum(~correct_before & correct_after)) + 0.5
    n = len(correct_before) + 2.0
    diff = (b - f) / n
    var = max((b + f) - (b - f) ** 2 / n, 0.0) / n**2
    return 100.0 * (diff + NormalDist().inv_cdf(confidence) * float(np.sqrt(var)))


def validation_needed(budget: float, confidence: float, broken: int = 1) -> int | None:
    """The fewest validation samples at which a change that breaks ``broken`` correct predictions
    (and fixes none) can still be certified within ``budget`` points at ``confidence``
    (``clean_drop_bound``); None when no size can (a zero budget). With ``broken=0`` only a change
    that alters no prediction could pass, and almost every useful change alters one."""
    if budget <= 0:
        return None

    def bound(n: int) -> float:
        after = np.ones(n, bool)
        after[:broken] = False
        return clean_drop_bound(np.ones(n, bool), after, confidence)

    hi = max(broken + 1, 2)
    while bound(hi) > budget:
        hi *= 2
    lo = hi // 2
    while lo + 1 < hi:  # the bound falls as n grows: the first n within the budget
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if bound(mid) > budget else (lo, mid)
    return hi


def mask_curve(head: Head, order: np.ndarray, counts, f_clean: np.ndarray, f_adv: np.ndarray, y: np.ndarray,
               existing: np.ndarray | None = None, confidence: float = 0.9,
               scale: np.ndarray | None = None) -> list[CurvePoint]:
    """Accuracy of the head on masked clean and adversarial features, for each count of new zeros,
    with the ``confidence`` bound on each point's clean-accuracy drop. With ``scale`` (a soft mask)
    every point that adds zeros also multiplies the features by it."""
    width = head.width
    before = head.apply(f_clean, mask_top(order, 0, width, existing)).argmax(1) == y
    points = []
    for k in counts:
        mask = mask_top(order, k, width, existing)
        if scale is not None and k > 0:
            mask = mask * scale
        masked = int((mask == 0).sum())
        correct = head.apply(f_clean, mask).argmax(1) == y
        adv = float((head.apply(f_adv, mask).argmax(1) == y).mean())
        bound = 0.0 if k == 0 else clean_drop_bound(before, correct, confidence)  # no new zero: no change
        points.append(CurvePoint(masked / width, masked, k, float(correct.mean()), adv, bound))
    return points


def choose_point(points: list, reference_clean: float, max_clean_drop: float, use_bound: bool = False,
                 floor: float | None = None):
    """The point (a ``CurvePoint``, or a ``strength.StrengthPoint``) with the best adversarial accuracy whose clean
    accuracy is at most ``max_clean_drop`` percentage points below ``reference_clean`` (with
    ``use_bound``: whose drop's upper confidence bound is within it); ties go to the smaller mask.
    None when nothing beats ``floor``, by default the adversarial accuracy of adding no mask."""
    if floor is None:
        floor = next(p for p in points if p.size == 0).adversarial_accuracy

    def within(p: CurvePoint) -> bool:
        point = 100 * (reference_clean - p.clean_accuracy)
        return point <= max_clean_drop + 1e-9 and (not use_bound or p.clean_drop_bound <= max_clean_drop + 1e-9)

    eligible = [p for p in points if within(p)]
    if not eligible:
        return None
    best = max(eligible, key=lambda p: (p.adversarial_accuracy, -p.size))
    return best if best.adversarial_accuracy > floor else None

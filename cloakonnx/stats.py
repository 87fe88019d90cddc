"""Per-feature statistics streamed from onnxruntime, with the feature tensor exposed as an output.

As onnxruntime's own calibrator does, the tensor that feeds the head is added as an extra graph
output; unlike it, only running sums are kept, so memory does not grow with the number of samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import CloakError


@dataclass
class FeatureStats:
    """Running sums per feature (channel, for 4-D tensors: averaged over space), in float64."""

    width: int
    ndim: int = 2  # rank of the feature tensor: 2 for a head input, 4 for a conv output
    count: int = 0
    sum_absdiff: np.ndarray = field(default=None, repr=False)  # sum |f_adv - f_clean|
    sum_clean: np.ndarray = field(default=None, repr=False)
    sum_clean_sq: np.ndarray = field(default=None, repr=False)
    sum_margin: np.ndarray | None = field(default=None, repr=False)  # needs the head's weights

    def __post_init__(self) -> None:
        for name in ("sum_absdiff", "sum_clean", "sum_clean_sq"):
            if getattr(self, name) is None:
                setattr(self, name, np.zeros(self.width, np.float64))

    def update(self, f_clean: np.ndarray, f_adv: np.ndarray, margin: np.ndarray | None = None) -> None:
        """Add a batch. ``margin`` is the per-sample, per-feature margin contribution (see ``margin_terms``)."""
        c, a = per_feature(f_clean), per_feature(f_adv)
        if margin is not None:
            self.sum_margin = (0 if self.sum_margin is None else self.sum_margin) + margin.sum(0)
        if c.shape[1] != self.width:
            raise CloakError(f"feature tensor has {c.shape[1]} features, expected {self.width}")
        self.count += len(c)
        self.sum_absdiff += np.abs(a - c).sum(0)
        self.sum_clean += c.sum(0)
        self.sum_clean_sq += (c * c).sum(0)

    def merge(self, other: "FeatureStats") -> None:
        """Add another stream's sums (a worker's, one onnxruntime batch at a time: added in the same order
        as ``update`` adds batches, the totals are the same to the bit)."""
        if other.width != self.width:
            raise CloakError(f"feature tensor has {other.width} features, expected {self.width}")
        self.count += other.count
        for name in ("sum_absdiff", "sum_clean", "sum_clean_sq"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        if other.sum_margin is not None:
            self.sum_margin = (0 if self.sum_margin is None else self.sum_margin) + other.sum_margin

    def mean_absdiff(self) -> np.ndarray:
        return self.sum_absdiff / max(self.count, 1)

    def clean_std(self) -> np.ndarray:
        n = max(self.count, 1)
        return np.sqrt(np.maximum(self.sum_clean_sq / n - (self.sum_clean / n) ** 2, 0.0))


def per_feature(f: np.ndarray) -> np.ndarray:
    """[N, C, ...] -> [N, C] in float64: spatial positions are averaged (one mask entry per channel)."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim > 2:
        f = f.reshape(f.shape[0], f.shape[1], -1).mean(-1)
    return f.reshape(f.shape[0], -1)


def margin_terms(f_clean: np.ndarray, f_adv: np.ndarray, adv_logits: np.ndarray, y: np.ndarray,
                 weight: np.ndarray) -> np.ndarray:
    """(f'_j - f_j) * (W[j, a] - W[j, y]) per sample: feature j's push of the logit margin from the
    true class y towards the adversarial class a (the runner-up where the attack failed)."""
    delta = per_feature(f_adv) - per_feature(f_clean)
    logits = adv_logits.reshape(len(adv_logits), -1).astype(np.float64).copy()
    logits[np.arange(len(y)), y] = -np.inf
    a = logits.argmax(1)
    return delta * (weight[:, a] - weight[:, y]).T


class StatsStream:
    """Feature statistics added as clean and adversarial batches arrive. Rows wait in a small buffer
    until ``batch_size`` of them can go through onnxruntime together, so the sums do not depend on the
    attack's batch; only running sums and two counters are kept."""

    def __init__(self, session, feature: str, logits: str, to_model, batch_size: int = 256,
                 head_weight: np.ndarray | None = None, keep_batches: bool = False):
        from .runtime import batch_size_for

        self.session, self.feature, self.logits, self.to_model = session, feature, logits, to_model
        self.batch_size = batch_size_for(session, batch_size)
        self.head_weight = head_weight
        self.stats: FeatureStats | None = None
        self.count = self.correct_clean = self.correct_adv = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        # with keep_batches: each onnxruntime batch's own sums, for a driver to merge (distributed.py)
        self.batches: list[FeatureStats] | None = [] if keep_batches else None

    def add(self, x_clean: np.ndarray, x_adv: np.ndarray, y: np.ndarray) -> None:
        self._pending.append((x_clean, x_adv, y))
        while sum(len(p[2]) for p in self._pending) >= self.batch_size:
            self._run(self.batch_size)

    def finish(self) -> tuple["FeatureStats", float, float]:
        """Run what is left; (FeatureStats, clean accuracy, adversarial accuracy) over everything added."""
        if self._pending:
            self._run(sum(len(p[2]) for p in self._pending))
        n = max(self.count, 1)
        return self.stats, self.correct_clean / n, self.correct_adv / n

    def _run(self, k: int) -> None:
        from .runtime import run_batch

        clean, adv, y = (np.concatenate([p[i] for p in self._pending]) for i in range(3))
        self._pending = [(clean[k:], adv[k:], y[k:])] if len(y) > k else []
        clean, adv, y = clean[:k], adv[:k], y[:k]
        f_c, l_c = run_batch(self.session, self.to_model(clean), [self.feature, self.logits])
        f_a, l_a = run_batch(self.session, self.to_model(adv), [self.feature, self.logits])
        if self.stats is None:
            self.stats = FeatureStats(per_feature(f_c).shape[1], ndim=np.ndim(f_c))
        margin = None
        w = self.head_weight
        if w is not None and np.ndim(f_c) == 2 and f_c.shape[1] == w.shape[0]:
            margin = margin_terms(f_c, f_a, l_a, y, w)
        self.stats.update(f_c, f_a, margin)
        if self.batches is not None:
            part = FeatureStats(self.stats.width, ndim=self.stats.ndim)
            part.update(f_c, f_a, margin)
            self.batches.append(part)
        self.count += len(y)
        self.correct_clean += int((l_c.reshape(len(l_c), -1).argmax(1) == y).sum())
        self.correct_adv += int((l_a.reshape(len(l_a), -1).argmax(1) == y).sum())

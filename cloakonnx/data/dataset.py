"""The labelled samples every command works on, whatever the source, and the calibration/validation split.

A ``Dataset`` holds box-space float32 inputs (a numpy array, or ``Rows`` read a batch at a time),
int64 labels, where they came from, and each sample's index in its source (which seeds its attack's
random start, so a sample is attacked the same way whichever batch or worker it lands in).
``Loaded`` is what a source's reader hands back before it becomes a ``Dataset``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CloakError
from .rows import Rows, take


@dataclass
class Loaded:
    """What a reader returns: the inputs (numpy or Rows, in their stored dtype's values) and labels."""

    x: object
    y: np.ndarray
    source: str


@dataclass
class Dataset:
    """Labelled samples. ``x`` is a float32 numpy array, or ``Rows`` read a batch at a time;
    ``index`` is each sample's index in the source, which seeds its attack's random start."""

    x: np.ndarray | Rows  # float32, [N, *input_shape], in the box
    y: np.ndarray  # int64, [N]
    source: str = ""
    index: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.index is None:
            self.index = np.arange(len(self.y), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def lazy(self) -> bool:
        return isinstance(self.x, Rows)

    def subset(self, idx: np.ndarray) -> "Dataset":
        idx = np.asarray(idx)
        return Dataset(take(self.x, idx), self.y[idx], self.source, self.index[idx])


def split(ds: Dataset, val_split: float, seed: int = 0, min_each: int = 1,
          val_max: int | None = None) -> tuple[Dataset, Dataset]:
    """Hold out ``val_split`` of the data for validation, at most ``val_max`` samples (the rest go to
    calibration); it is never used for scoring features. Decided per sample index, with the seed."""
    if not 0 < val_split < 1:
        raise CloakError(f"--val-split must be in (0, 1), got {val_split}")
    n = len(ds)
    n_val = int(round(n * val_split))
    if n_val < min_each or n - n_val < min_each:
        raise CloakError(
            f"the dataset has {n} samples: too few for a {val_split:g} validation split "
            f"(need at least {min_each} for calibration and for validation)"
        )
    if val_max is not None:
        n_val = min(n_val, val_max)
    perm = np.random.default_rng(seed).permutation(n)
    return ds.subset(np.sort(perm[n_val:])), ds.subset(np.sort(perm[:n_val]))

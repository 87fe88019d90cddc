"""Refusing data that would silently give a wrong mask, with an error that says what is wrong.

Every source's reader checks what it can see cheaply as it reads (``check_labels``,
``check_inputs_dtype``); ``validate`` then checks the data against the model: sample shape, NaN or
Inf, values outside the box (``box_check``), label range. Lazily read inputs cannot be checked
up front, so they are wrapped to check every batch as it is read.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import CloakError
from .dataset import Dataset
from .rows import Checked, Rows

EARLY_ROWS = 64  # rows of lazily read data that validate checks itself, so bad values fail before any work


def check_labels(y: np.ndarray, where: str) -> np.ndarray:
    """1-D integer labels (whole-valued floats accepted), or a clear error naming ``where``."""
    y = np.asarray(y)
    if y.ndim == 0:
        raise CloakError(f"{where}: labels must be an array with one entry per sample, got a scalar")
    if y.ndim != 1:
        y = y.reshape(-1) if y.size == len(y) else y
    if y.ndim != 1:
        raise CloakError(f"{where}: 'y' must be a 1-D array of integer labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            return y.astype(np.int64)
        raise CloakError(f"{where}: labels 'y' must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def check_inputs_dtype(dtype: np.dtype, where: str) -> None:
    if not np.issubdtype(dtype, np.number) or dtype == np.bool_ or np.issubdtype(dtype, np.complexfloating):
        raise CloakError(f"{where}: 'x' must be numeric, got dtype {dtype}")


def validate(ds: Dataset, input_shape: Sequence, bounds: tuple[float, float], num_classes: int | None) -> Dataset:
    """Refuse data that would silently give a wrong mask: wrong shape, NaN, out of box, bad labels
    (labels are checked when ``num_classes`` is given). Returns the data to use: lazily read inputs
    come back wrapped so that every batch read is checked (the first ``EARLY_ROWS`` are, now)."""
    from ..graph import fixed_size

    if len(ds) == 0:
        raise CloakError(f"the dataset {ds.source} is empty")
    want = [fixed_size(d) for d in list(input_shape)[1:]]
    got = list(ds.x.shape[1:])
    if len(want) != len(got) or any(w is not None and w != g for w, g in zip(want, got)):
        shown = ["N"] + [w if w is not None else "?" for w in want]
        raise CloakError(
            f"data samples have shape {tuple(got)} (x is {tuple(ds.x.shape)}) but the model input is "
            f"[{', '.join(map(str, shown))}]"
        )
    if ds.x[0].size == 0:
        raise CloakError(f"data samples have shape {tuple(ds.x.shape[1:])}: they hold no values")
    check = box_check(bounds)
    if isinstance(ds.x, Checked):
        pass
    elif isinstance(ds.x, Rows):  # every batch is checked as it is read
        ds = Dataset(Checked(ds.x, check), ds.y, ds.source, ds.index)
        ds.x.check_first(min(len(ds), EARLY_ROWS))  # and the first ones now, to fail early
    else:
        check(ds.x, None)
    if num_classes is None:
        return ds
    ymin, ymax = int(ds.y.min()), int(ds.y.max())
    if ymin < 0 or ymax >= num_classes:
        raise CloakError(f"labels range over [{ymin}, {ymax}] but the model has {num_classes} classes (0..{num_classes - 1})")
    return ds


def box_check(bounds: tuple[float, float]):
    """A check of a batch of samples (``idx``: their indices, for the message): finite, inside the box."""
    lo, hi = bounds
    tol = 1e-6 * (hi - lo)

    def check(x: np.ndarray, idx: np.ndarray | None) -> None:
        finite = np.isfinite(x).reshape(len(x), -1).all(1)
        if not finite.all():
            where = "" if idx is None else f" (samples {', '.join(map(str, idx[~finite][:5]))})"
            raise CloakError(f"the data has NaN or Inf values in {int((~finite).sum())} sample(s){where}")
        xmin, xmax = float(x.min()), float(x.max())
        if xmin < lo - tol or xmax > hi + tol:
            raise CloakError(
                f"the data lies in [{xmin:.4g}, {xmax:.4g}], outside --bounds {lo:g},{hi:g}; "
                "give the box your inputs live in (normalise with --mean/--std, not in the data)")

    return check

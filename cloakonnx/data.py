"""Datasets (npz, image folder, bundled digits), validation, splits and the box/normalisation.

Inputs live in a box (``--bounds``, default [0, 1]) where attacks work and eps is measured, as in
torchattacks and RobustBench; an optional per-channel ``--mean/--std`` maps the box to what the
model expects.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import CloakError, first_line
from .sources import (IMAGE_SUFFIXES, Checked, ImageTransform, Rows, calibration_reader, check_labels, image_folder,
                      loader_script, npy_rows, npz_inputs, take)

log = logging.getLogger(__name__)

__all__ = ["Dataset", "IMAGE_SUFFIXES", "ImageTransform", "LoaderScript", "Preprocess", "from_calibration_reader",
           "load_data", "split", "validate"]


@dataclass
class Dataset:
    """Labelled samples. ``x`` is a float32 numpy array, or ``sources.Rows`` read a batch at a time;
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


@dataclass
class Preprocess:
    """The box the data lives in and the normalisation applied between box and model."""

    bounds: tuple[float, float] = (0.0, 1.0)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None

    def __post_init__(self) -> None:
        lo, hi = self.bounds
        if not lo < hi:
            raise CloakError(f"--bounds must be LOW,HIGH with LOW < HIGH, got {lo},{hi}")
        if (self.mean is None) != (self.std is None):
            raise CloakError("--mean and --std go together: give both or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise CloakError("--std values must be positive")

    @property
    def normalises(self) -> bool:
        return self.mean is not None

    def _stats(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        shape = (1, -1) + (1,) * (ndim - 2)  # per channel, axis 1
        return (np.asarray(self.mean, np.float32).reshape(shape), np.asarray(self.std, np.float32).reshape(shape))

    def to_model(self, x: np.ndarray) -> np.ndarray:
        """Box space -> what the model's input expects."""
        if not self.normalises:
            return x
        mean, std = self._stats(x.ndim)
        return ((x - mean) / std).astype(np.float32)

    def torch_wrap(self, module, ndim: int):
        """A torch callable taking box-space inputs (normalisation inside, as torchattacks expects)."""
        if not self.normalises:
            return module
        import torch

        class Normalised(torch.nn.Module):
            def __init__(self, inner, mean, std):
                super().__init__()
                self.inner = inner
                self.register_buffer("mean", torch.as_tensor(mean))
                self.register_buffer("std", torch.as_tensor(std))

            def forward(self, x):
                return self.inner((x - self.mean) / self.std)

        mean, std = self._stats(ndim)
        return Normalised(module, mean, std)


def parse_floats(text: str | None, what: str) -> list[float] | None:
    """Parse '0.5,0.5,0.5' style options with an error that names the option."""
    if text is None or text == "":
        return None
    try:
        return [float(v) for v in str(text).split(",") if v.strip() != ""]
    except ValueError:
        raise CloakError(f"{what} must be comma-separated numbers, got {text!r}") from None


def load_npz(path: str | os.PathLike) -> Dataset:
    """An ``.npz`` with ``x`` and ``y``; ``x`` is read by rows from disk, not loaded (see ``sources``)."""
    p = Path(path)
    x, y = npz_inputs(p)
    return _checked(x, y, str(p))


def load_npy(x_path: Path, y_path: Path, where: str) -> Dataset:
    """A pair of ``.npy`` files (inputs read by rows from disk, labels loaded)."""
    for f in (x_path, y_path):
        if not f.is_file():
            raise CloakError(f"{where}: no file {f}")
    x = npy_rows(x_path, str(x_path))
    try:
        y = np.load(y_path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - format errors
        raise CloakError(f"{y_path} is not a readable .npy file: {first_line(exc)}") from exc
    return _checked(x, y, where)


def _checked(x, y, where: str) -> Dataset:
    if np.ndim(y) == 0:
        raise CloakError(f"{where}: 'x' and 'y' must be arrays with one entry per sample, got scalars")
    y = check_labels(y, where)
    if len(x) != len(y):
        raise CloakError(f"{where}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return Dataset(x, y, where)


def load_image_folder(path: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3,
                      bounds: tuple[float, float] = (0.0, 1.0), transform: ImageTransform | None = None,
                      workers: int | None = None) -> Dataset:
    """A folder of class sub-folders (sorted names are the labels 0..K-1), like torchvision's ImageFolder;
    decoded a batch at a time."""
    loaded = image_folder(Path(path), transform or ImageTransform(size=size), channels, bounds, workers)
    return Dataset(loaded.x, loaded.y, loaded.source)


def digits_dataset(side: int = 8) -> Dataset:
    """scikit-learn's bundled handwritten digits (1,797 real 8x8 images): real data, no download."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    if side != 8:
        import torch
        import torch.nn.functional as F

        x = F.interpolate(torch.from_numpy(x), size=(side, side), mode="bilinear", align_corners=False).numpy()
    return Dataset(np.clip(x, 0, 1), d.target.astype(np.int64), "sklearn.datasets.load_digits")


@dataclass(frozen=True)
class LoaderScript:
    """Polygraphy's ``--data-loader-script file.py:func``: ``func()`` yields ``(x, y)`` batches."""

    spec: str

    def __str__(self) -> str:
        return self.spec


def from_calibration_reader(reader, labels=None, label_key: str | None = None,
                            input_name: str | None = None) -> Dataset:
    """Data from an onnxruntime quantization ``CalibrationDataReader`` (``get_next()`` gives feed
    dicts, then None), with labels from ``label_key`` in its dicts or from ``labels`` (an iterable in
    the same order). Read once, spooled to a temporary file; pass the result as ``data``."""
    loaded = calibration_reader(reader, labels, label_key, input_name)
    return Dataset(loaded.x, loaded.y, loaded.source)


def load_data(path: str | os.PathLike | LoaderScript, size: tuple[int, int] | None = None, channels: int = 3,
              bounds: tuple[float, float] = (0.0, 1.0), transform: ImageTransform | None = None,
              workers: int | None = None) -> Dataset:
    """Any file source: ``.npz``; a folder holding ``x.npy`` and ``y.npy``, or ``X.npy,Y.npy``; a folder of
    class sub-folders of images. The inputs are read a batch at a time, not loaded."""
    if isinstance(path, LoaderScript):
        loaded = loader_script(path.spec)
        return Dataset(loaded.x, loaded.y, loaded.source)
    text = str(path)
    if "," in text and all(part.strip().lower().endswith(".npy") for part in text.split(",")):
        xs, ys = (Path(part.strip()) for part in text.split(",", 1))
        return load_npy(xs, ys, text)
    p = Path(path)
    if not p.exists():
        raise CloakError(f"data not found: {p}")
    if p.is_dir():
        if (p / "x.npy").is_file() or (p / "y.npy").is_file():
            return load_npy(p / "x.npy", p / "y.npy", str(p))
        return load_image_folder(p, size, channels, bounds, transform, workers)
    if p.suffix.lower() == ".npz":
        return load_npz(p)
    raise CloakError(f"unsupported data {p}: give an .npz file with 'x' and 'y', a folder holding x.npy and y.npy, "
                     "or a folder of class sub-folders of images")


def validate(ds: Dataset, input_shape: Sequence, bounds: tuple[float, float], num_classes: int | None) -> Dataset:
    """Refuse data that would silently give a wrong mask: wrong shape, NaN, out of box, bad labels
    (labels are checked when ``num_classes`` is given). Returns the data to use: lazily read inputs
    come back wrapped so that every batch read is checked (the first one is, now)."""
    from .graph import fixed_size

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
    elif isinstance(ds.x, Rows):  # every batch is checked as it is read; the first one now, to fail early
        ds = Dataset(Checked(ds.x, check), ds.y, ds.source, ds.index)
        ds.x[: min(len(ds), 64)]
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


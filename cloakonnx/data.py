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

from .errors import CloakError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class Dataset:
    x: np.ndarray  # float32, [N, *input_shape], in the box
    y: np.ndarray  # int64, [N]
    source: str = ""

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray) -> "Dataset":
        return Dataset(self.x[idx], self.y[idx], self.source)


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
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = {"x", "y"} - keys
            if missing:
                raise CloakError(
                    f"{p} must hold arrays 'x' (inputs) and 'y' (integer labels); "
                    f"missing {', '.join(sorted(missing))}, found {', '.join(sorted(keys)) or 'nothing'}"
                )
            x, y = npz["x"], npz["y"]
    except CloakError:
        raise
    except Exception as exc:  # zipfile / pickle / format errors
        raise CloakError(f"{p} is not a readable .npz file: {exc}") from exc
    if x.ndim == 0 or y.ndim == 0:
        raise CloakError(f"{p}: 'x' and 'y' must be arrays with one entry per sample, got scalars")
    if not np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_ or np.iscomplexobj(x):
        raise CloakError(f"{p}: 'x' must be numeric, got dtype {x.dtype}")
    if y.ndim != 1:
        y = y.reshape(-1) if y.size == len(y) else y
    if y.ndim != 1:
        raise CloakError(f"{p}: 'y' must be a 1-D array of integer labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.int64)
        else:
            raise CloakError(f"{p}: labels 'y' must be integers, got dtype {y.dtype}")
    if len(x) != len(y):
        raise CloakError(f"{p}: 'x' has {len(x)} samples but 'y' has {len(y)}")
    return Dataset(x.astype(np.float32, copy=False), y.astype(np.int64), str(p))


def load_image_folder(path: str | os.PathLike, size: tuple[int, int] | None, channels: int = 3,
                      bounds: tuple[float, float] = (0.0, 1.0)) -> Dataset:
    """A folder of class sub-folders (sorted names are the labels 0..K-1), like torchvision's ImageFolder."""
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        raise CloakError("reading image folders needs Pillow: pip install pillow") from None
    root = Path(path)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise CloakError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise CloakError(f"image folders need a model with 1 or 3 input channels, got {channels}")
    xs, ys, skipped = [], [], 0
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if size is not None:
                        im = im.resize((size[1], size[0]), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.float32) / 255.0
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, counted
                log.warning("skipping unreadable image %s: %s", f, exc)
                skipped += 1
                continue
            arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
            xs.append(arr)
            ys.append(label)
    if skipped:
        log.warning("skipped %d unreadable image file(s) in %s", skipped, root)
    if not xs:
        raise CloakError(f"{root} has no readable images in its class sub-folders")
    shapes = {a.shape for a in xs}
    if len(shapes) > 1:
        raise CloakError(f"images in {root} have different sizes {sorted(shapes)[:3]}...; resize them with --size H,W")
    lo, hi = bounds
    x = np.stack(xs) * (hi - lo) + lo
    return Dataset(x.astype(np.float32), np.asarray(ys, np.int64), str(root))


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


def load_data(path: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3,
              bounds: tuple[float, float] = (0.0, 1.0)) -> Dataset:
    p = Path(path)
    if not p.exists():
        raise CloakError(f"data not found: {p}")
    if p.is_dir():
        return load_image_folder(p, size, channels, bounds)
    if p.suffix.lower() == ".npz":
        return load_npz(p)
    raise CloakError(f"unsupported data {p}: give an .npz file with 'x' and 'y', or a folder of class sub-folders")


def validate(ds: Dataset, input_shape: Sequence, bounds: tuple[float, float], num_classes: int | None) -> None:
    """Refuse data that would silently give a wrong mask: wrong shape, NaN, out of box, bad labels
    (labels are checked when ``num_classes`` is given)."""
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
    if not np.all(np.isfinite(ds.x)):
        bad = int((~np.isfinite(ds.x)).reshape(len(ds), -1).any(1).sum())
        raise CloakError(f"the data has NaN or Inf values in {bad} sample(s)")
    lo, hi = bounds
    xmin, xmax = float(ds.x.min()), float(ds.x.max())
    tol = 1e-6 * (hi - lo)
    if xmin < lo - tol or xmax > hi + tol:
        raise CloakError(
            f"the data lies in [{xmin:.4g}, {xmax:.4g}], outside --bounds {lo:g},{hi:g}; "
            "give the box your inputs live in (normalise with --mean/--std, not in the data)"
        )
    if num_classes is None:
        return
    ymin, ymax = int(ds.y.min()), int(ds.y.max())
    if ymin < 0 or ymax >= num_classes:
        raise CloakError(f"labels range over [{ymin}, {ymax}] but the model has {num_classes} classes (0..{num_classes - 1})")


def split(ds: Dataset, val_split: float, seed: int = 0, min_each: int = 1) -> tuple[Dataset, Dataset]:
    """Hold out ``val_split`` of the data for validation; it is never used for scoring features."""
    if not 0 < val_split < 1:
        raise CloakError(f"--val-split must be in (0, 1), got {val_split}")
    n = len(ds)
    n_val = int(round(n * val_split))
    if n_val < min_each or n - n_val < min_each:
        raise CloakError(
            f"the dataset has {n} samples: too few for a {val_split:g} validation split "
            f"(need at least {min_each} for calibration and for validation)"
        )
    perm = np.random.default_rng(seed).permutation(n)
    return ds.subset(np.sort(perm[n_val:])), ds.subset(np.sort(perm[:n_val]))


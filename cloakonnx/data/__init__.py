"""The data cloakonnx reads: every source becomes a ``Dataset`` read a batch at a time.

Memory stays flat in the number of samples: every source's inputs become ``Rows``, an array-like
of box-space float32 samples that reads only the rows asked for. One module per kind of source:

- ``arrays``: ``.npz`` and ``.npy`` files, read by rows from disk;
- ``images``: folders of class sub-folders of images, decoded on demand by a thread pool;
- ``scripts``: ``--data-loader-script`` functions and ``CalibrationDataReader``s, spooled once;
- ``digits``: scikit-learn's bundled digits, for the demo;

and one for each thing they share: ``rows`` (the array-like, subsets, spools), ``dataset``
(``Dataset`` and the split), ``preprocess`` (the box and the normalisation), ``validate`` (refusing
bad data), ``prefetch`` (reading the next batch ahead, and ``DATA_WAIT``). This module is the
public surface, and ``load_data`` decides which source a path is. torch is never imported here.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..errors import CloakError
from .arrays import load_npy, load_npz
from .dataset import Dataset, Loaded, split
from .digits import digits_dataset
from .images import IMAGE_SUFFIXES, ImageTransform, ImageRows, image_folder, load_image_folder
from .prefetch import DATA_WAIT, WaitClock, batch_bounds, prefetched
from .preprocess import Preprocess
from .rows import Checked, OutputRows, RowFile, Rows, Spool, Take, take
from .scripts import LoaderScript, from_calibration_reader, load_loader_script
from .validate import box_check, check_labels, validate

__all__ = ["Checked", "DATA_WAIT", "Dataset", "IMAGE_SUFFIXES", "ImageRows", "ImageTransform", "LoaderScript",
           "Loaded", "OutputRows", "Preprocess", "RowFile", "Rows", "Spool", "Take", "WaitClock", "batch_bounds",
           "box_check", "check_labels", "digits_dataset", "from_calibration_reader", "image_folder", "load_data",
           "load_image_folder", "load_npy", "load_npz", "prefetched", "split", "take", "validate"]


def load_data(path: str | os.PathLike | LoaderScript, size: tuple[int, int] | None = None, channels: int = 3,
              bounds: tuple[float, float] = (0.0, 1.0), transform: ImageTransform | None = None,
              workers: int | None = None) -> Dataset:
    """Any file source: ``.npz``; a folder holding ``x.npy`` and ``y.npy``, or ``X.npy,Y.npy``; a folder of
    class sub-folders of images; or a ``LoaderScript``. The inputs are read a batch at a time, not loaded."""
    if isinstance(path, LoaderScript):
        return load_loader_script(path)
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

"""Image-folder sources (torchvision's ImageFolder layout), decoded a batch at a time.

Only headers are read when the folder is opened; pixels are decoded on demand by a small thread
pool (Pillow releases the GIL), resized or cropped as ``ImageTransform`` says (torchvision's
``Resize`` then ``CenterCrop``), and scaled into the box.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CloakError, first_line
from .dataset import Dataset, Loaded
from .rows import Rows

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class ImageTransform:
    """How images become samples. ``size`` (H, W) resizes straight to it; ``resize`` S then
    ``crop`` C follow torchvision: the short side to S (bilinear, antialiased), then a centred C x C."""

    size: tuple[int, int] | None = None
    resize: int | None = None
    crop: int | None = None

    def __post_init__(self) -> None:
        if self.size is not None and (self.resize is not None or self.crop is not None):
            raise CloakError("give --size H,W, or --resize S with --crop C, not both")
        for name, v in (("--resize", self.resize), ("--crop", self.crop)):
            if v is not None and v < 1:
                raise CloakError(f"{name} must be a positive number of pixels, got {v}")
        if self.size is not None and min(self.size) < 1:
            raise CloakError(f"--size must be positive, got {self.size}")

    def out_size(self, width: int, height: int) -> tuple[int, int]:
        """(H, W) of an image of ``width`` x ``height`` after the transform."""
        if self.size is not None:
            return self.size
        if self.resize is not None:
            width, height = self.resized(width, height)
        if self.crop is not None:
            return self.crop, self.crop
        return height, width

    def resized(self, width: int, height: int) -> tuple[int, int]:
        short, long = (width, height) if width <= height else (height, width)
        new_long = int(self.resize * long / short)
        return (self.resize, new_long) if width <= height else (new_long, self.resize)

    def apply(self, im):
        from PIL import Image

        if self.size is not None:
            return im.resize((self.size[1], self.size[0]), Image.BILINEAR)
        if self.resize is not None:
            im = im.resize(self.resized(*im.size), Image.BILINEAR)
        if self.crop is not None:
            w, h = im.size
            if self.crop > w or self.crop > h:
                raise CloakError(f"--crop {self.crop} is larger than an image of {w}x{h} (after --resize)")
            top, left = int(round((h - self.crop) / 2.0)), int(round((w - self.crop) / 2.0))
            im = im.crop((left, top, left + self.crop, top + self.crop))
        return im


class ImageRows(Rows):
    """Images decoded on demand by a thread pool: only the batch asked for is in memory."""

    def __init__(self, files: list[Path], mode: str, transform: ImageTransform, shape: tuple[int, ...],
                 bounds: tuple[float, float], workers: int):
        super().__init__(shape)
        self.files, self.mode, self.transform, self.bounds, self.workers = files, mode, transform, bounds, workers
        self._pool: ThreadPoolExecutor | None = None

    def decode(self, i: int) -> np.ndarray:
        from PIL import Image

        f = self.files[i]
        try:
            with Image.open(f) as im:
                arr = np.asarray(self.transform.apply(im.convert(self.mode)), dtype=np.float32) / 255.0
        except CloakError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file that passed the header check but does not decode
            raise CloakError(f"cannot decode image {f}: {first_line(exc)}") from exc
        arr = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)
        if arr.shape != self.shape[1:]:
            raise CloakError(f"image {f} gives shape {arr.shape}, the others {self.shape[1:]}; resize them with "
                             "--size H,W or --resize S --crop C")
        lo, hi = self.bounds
        return arr * (hi - lo) + lo

    def read(self, idx: np.ndarray) -> np.ndarray:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="cloakonnx-decode")
        return np.stack(list(self._pool.map(self.decode, idx.tolist()))).astype(np.float32, copy=False)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_pool"] = None
        return state


def image_folder(root: Path, transform: ImageTransform, channels: int, bounds: tuple[float, float],
                 workers: int | None = None) -> Loaded:
    """A folder of class sub-folders (sorted names are the labels 0..K-1), as torchvision's
    ImageFolder. Only headers are read here (unreadable files are skipped, counted); pixels are
    decoded when a batch is read."""
    from PIL import Image

    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not classes:
        raise CloakError(f"{root} has no class sub-folders (expected {root}/<class>/<image files>)")
    mode = {1: "L", 3: "RGB"}.get(channels)
    if mode is None:
        raise CloakError(f"image folders need a model with 1 or 3 input channels, got {channels}")
    files, labels, sizes, skipped = [], [], set(), 0
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                with Image.open(f) as im:
                    sizes.add(transform.out_size(*im.size))
            except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, counted
                log.warning("skipping unreadable image %s: %s", f, exc)
                skipped += 1
                continue
            files.append(f)
            labels.append(label)
    if skipped:
        log.warning("skipped %d unreadable image file(s) in %s", skipped, root)
    if not files:
        raise CloakError(f"{root} has no readable images in its class sub-folders")
    if len(sizes) > 1:
        raise CloakError(f"images in {root} have different sizes {sorted(sizes)[:3]}...; resize them with --size H,W "
                         "or --resize S --crop C")
    (h, w), = sizes
    workers = workers or min(4, os.cpu_count() or 1)
    rows = ImageRows(files, mode, transform, (len(files), channels, h, w), bounds, workers)
    return Loaded(rows, np.asarray(labels, np.int64), str(root))


def load_image_folder(path: str | os.PathLike, size: tuple[int, int] | None = None, channels: int = 3,
                      bounds: tuple[float, float] = (0.0, 1.0), transform: ImageTransform | None = None,
                      workers: int | None = None) -> Dataset:
    """A folder of class sub-folders (sorted names are the labels 0..K-1), like torchvision's ImageFolder;
    decoded a batch at a time."""
    loaded = image_folder(Path(path), transform or ImageTransform(size=size), channels, bounds, workers)
    return Dataset(loaded.x, loaded.y, loaded.source)

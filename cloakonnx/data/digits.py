"""The demo's data: scikit-learn's bundled handwritten digits, real images with no download.

Also what the tests and benchmarks train and attack. torch is imported only to resize them.
"""
from __future__ import annotations

import numpy as np

from .dataset import Dataset


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

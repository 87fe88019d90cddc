"""The box the data lives in, and the normalisation between that box and the model.

Inputs live in a box (``--bounds``, default [0, 1]) where attacks work and eps is measured, as in
torchattacks and RobustBench; an optional per-channel ``--mean/--std`` maps the box to what the
model expects. Kept apart from the readers because attacks, runners and the config need it without
any data. torch is imported only inside ``torch_wrap``, so importing this module stays light.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import CloakError


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

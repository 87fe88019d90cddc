"""The state of a mask search, shared by harden's single-tensor rounds and the multi-tensor search
(:mod:`cloakonnx.layers`): the original's figures on validation, and the masks found so far."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .runner import Runner


@dataclass
class Baseline:
    """The original model on the validation split; ``adv`` was crafted on it (the transfer set)."""

    clean: float
    adv: np.ndarray
    adv_accuracy: float
    guard: float | None = None  # the worst case under the guard's attacks (strength.never_worse), once computed


@dataclass
class MaskSearch:
    """Where the search for a mask ended: the mask per tensor, and the model hardened so far.

    ``masks`` holds every masked tensor's final values (flat: per feature, or per channel of a 4-D
    tensor), earlier masks of the input model included; ``primary`` is the tensor the report's flat
    fields describe (the head's input when it is masked)."""

    primary: str
    runner: Runner  # the model hardened so far (the original when nothing was added)
    masks: dict[str, np.ndarray | None]
    ranks: dict[str, int]
    previously: int  # features already zeroed in the input model, over all masked tensors
    widths: dict[str, int] = field(default_factory=dict)
    rounds: list[dict] = field(default_factory=list)
    calibration: dict = field(default_factory=dict)
    curve: list | None = None
    scores: np.ndarray | None = None
    learning: dict | None = None  # seconds, steps and loss history of a learned mask

    def __post_init__(self) -> None:
        self.initial = dict(self.masks)  # the input model's masks: what "changed" compares with

    @property
    def mask(self) -> np.ndarray | None:
        return self.masks.get(self.primary)

    @property
    def width(self) -> int:
        return sum(self.widths.values())

    @property
    def masked(self) -> int:
        zeros = sum(int((m == 0).sum()) for m in self.masks.values() if m is not None)
        return zeros if any(m is not None for m in self.masks.values()) else self.previously

    @property
    def changed(self) -> bool:
        """Whether the search altered any mask (new zeros, or values scaled at a strength below 1)."""
        return any(not _same(m, self.initial.get(t)) for t, m in self.masks.items())

    def describe(self) -> list[dict]:
        """One entry per masked tensor: its width and how many values are zeroed or scaled."""
        return [{"tensor": t, "rank": self.ranks.get(t, 2), "width": self.widths.get(t, 0),
                 "zeroed": int((m == 0).sum()), "scaled": int(((m > 0) & (m < 1)).sum())}
                for t, m in self.masks.items() if m is not None]


def _same(mask: np.ndarray | None, before: np.ndarray | None) -> bool:
    if mask is None or before is None:
        return mask is None and before is None
    return bool(np.array_equal(mask, before))

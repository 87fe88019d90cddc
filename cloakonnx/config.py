"""Typed options for every command, each checked by its own ``validate()`` before any work is done.

One meaning per name: ``attack.batch_size`` is the attack batch (torch), ``ort_batch_size`` the
onnxruntime batch, ``logits`` the graph output that carries the logits, ``output`` a file path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .attacks.base import AttackConfig
from .curve import DEFAULT_FRACTIONS
from .data import Preprocess
from .errors import CloakError
from .mask import SCORES, count_for


@dataclass
class CommonConfig:
    """What every command that attacks a model shares: the data's box, the model's names, the
    runtime, and the attack (for ``evaluate``, the settings every attack shares)."""

    attack: AttackConfig = field(default_factory=AttackConfig)
    preprocess: Preprocess = field(default_factory=Preprocess)
    input_name: str | None = None
    logits: str | None = None  # the graph output that carries the logits; None: found from the head
    image_size: tuple[int, int] | None = None  # for image folders
    seed: int = 0
    ort_batch_size: int = 256  # onnxruntime batches (statistics, accuracy)
    device: str | None = None  # torch device for attacks; None: cuda when available
    providers: Sequence[str] | None = None  # onnxruntime providers; None: CUDA if it loads, else CPU

    def validate(self) -> None:
        self.attack.validate(self.preprocess.bounds)
        if self.ort_batch_size < 1:
            raise CloakError(f"the onnxruntime batch must be at least 1, got {self.ort_batch_size}")


@dataclass
class MaskConfig(CommonConfig):
    """How a mask is scored and chosen: shared by ``harden`` and ``sweep``."""

    val_split: float = 0.2
    feature_tensor: str | None = None  # None: the head's input
    score: str = "absdiff"
    fraction: float = 0.01
    max_clean_drop: float | None = None  # percentage points; None: mask exactly ``fraction``
    # The drop's one-sided upper confidence bound on new data must also be within the budget
    # (cloakonnx.curve.clean_drop_bound); 0 uses the validation point estimate alone.
    budget_confidence: float = 0.9
    fractions: tuple[float, ...] = DEFAULT_FRACTIONS  # candidates for max_clean_drop and sweep

    def validate(self) -> None:
        super().validate()
        count_for(self.fraction, 1)
        if self.score not in SCORES:
            raise CloakError(f"unknown score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.max_clean_drop is not None and self.max_clean_drop < 0:
            raise CloakError(f"--max-clean-drop must be non-negative, got {self.max_clean_drop:g}")
        if not (self.budget_confidence == 0 or 0.5 <= self.budget_confidence < 1):
            raise CloakError(f"--budget-confidence must be 0 (point estimate only) or in [0.5, 1), "
                             f"got {self.budget_confidence:g}")


@dataclass
class HardenConfig(MaskConfig):
    """Everything ``harden`` needs besides the model and the data."""

    output: Path | None = None  # default: <model>.cloaked.onnx next to the model
    rounds: int = 1
    adaptive: bool = True  # also attack the hardened model itself
    curve: bool = False  # also report the trade-off curve and feature scores (the CLI's --plot draws them)
    fold: bool = False  # multiply the mask into the head's weights instead of adding a Mul node

    def validate(self) -> None:
        super().validate()
        if self.rounds < 1:
            raise CloakError(f"--rounds must be at least 1, got {self.rounds}")


def _evaluate_attack() -> AttackConfig:
    # 20 steps, not harden's 10: evaluation measures robustness, so it attacks harder by default.
    return AttackConfig(steps=20)


@dataclass
class EvaluateConfig(CommonConfig):
    """Which attacks, at which budgets, against which threat models. ``attack`` holds the settings
    every attack shares (norm, steps, restarts, queries, batch); its name and eps are set per run."""

    attack: AttackConfig = field(default_factory=_evaluate_attack)
    attacks: tuple[str, ...] = ("fgsm", "pgd", "square")
    eps: tuple[float, ...] = (8 / 255,)
    preset: str | None = None  # "standard" overrides attacks and their settings
    reference: Path | None = None  # the unhardened model, for transfer attacks
    max_samples: int | None = None
    sanity: bool = True  # also run the large-eps check

    def validate(self) -> None:
        if not self.eps:
            raise CloakError("--eps needs at least one value")
        if self.max_samples is not None and self.max_samples < 1:
            raise CloakError(f"--max-samples must be at least 1, got {self.max_samples}")

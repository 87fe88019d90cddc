"""Attack options and the small base class every attack shares (torchattacks-style).

Attacks work in the data's box ([lo, hi], default [0, 1]); the model callable they get takes
box-space inputs and returns logits (normalisation, if any, is inside it).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from ..errors import CloakError

NORMS = ("linf", "l2")
COMMON_SETTINGS = ("name", "eps", "norm", "seed", "batch_size")  # every attack takes these


@dataclass
class AttackConfig:
    """How adversarial inputs are crafted. ``step_size`` None means 2.5 * eps / steps (Madry et al.)."""

    name: str = "pgd"
    eps: float = 8 / 255
    norm: str = "linf"
    steps: int = 10
    step_size: float | None = None
    random_start: bool = True
    restarts: int = 1
    queries: int = 1000  # gradient-free attacks only
    seed: int = 0
    batch_size: int | None = None  # None: sized to the device (cloakonnx.batching)

    def validate(self, bounds: tuple[float, float]) -> None:
        width = bounds[1] - bounds[0]
        if self.norm not in NORMS:
            raise CloakError(f"--norm must be one of {', '.join(NORMS)}, got {self.norm!r}")
        if self.eps < 0:
            raise CloakError(f"--eps must be non-negative, got {self.eps:g}")
        if self.norm == "linf" and self.eps > width:
            raise CloakError(f"--eps {self.eps:g} is larger than the box {bounds[0]:g},{bounds[1]:g} allows (at most {width:g} in L-inf)")
        if self.steps < 1:
            raise CloakError(f"--steps must be at least 1, got {self.steps}")
        if self.step_size is not None and self.step_size <= 0:
            raise CloakError(f"--step-size must be positive, got {self.step_size:g}")
        if self.batch_size is not None and self.batch_size < 1:
            raise CloakError(f"--batch-size must be at least 1, got {self.batch_size}")

    @property
    def alpha(self) -> float:
        return self.step_size if self.step_size is not None else 2.5 * self.eps / self.steps

    def to_dict(self) -> dict:
        """Every setting of the run (what harden records): the options given, for whichever attack."""
        d = asdict(self)
        d["step_size"] = self.alpha
        return d

    def describe(self) -> dict:
        """The settings this config's attack actually uses (its class's ``settings``, plus the ones
        every attack takes): what a report lists per attack."""
        from . import ATTACKS

        used = COMMON_SETTINGS + ATTACKS[self.name].settings
        return {k: v for k, v in self.to_dict().items() if k in used}


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of a run seeded with ``seed`` (numpy's SeedSequence mixing)."""
    import numpy as np

    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0] >> 1)


class Attack:
    """Base class: ``attack(x, y)`` returns adversarial inputs within the eps ball and the box."""

    needs_gradients = True
    # the AttackConfig fields this attack reads besides COMMON_SETTINGS (torchattacks-style: each
    # attack has its own options; the shared config is what the CLI's one set of flags fills)
    settings: tuple[str, ...] = ()

    def __init__(self, model: Callable, config: AttackConfig, bounds: tuple[float, float] = (0.0, 1.0)):
        import torch

        self.model = model
        self.config = config
        self.lo, self.hi = bounds
        self.generator = torch.Generator(device="cpu").manual_seed(config.seed)  # reseeded per batch by set_samples
        self.sample_index: list[int] | None = None
        self._sample_generators: list | None = None

    def set_samples(self, index) -> None:
        """The source indices of the next batch's samples: each sample's random start then comes from
        its own generator, seeded with (seed, index), so it does not depend on the batch it falls in
        (nor on the source, nor on how the data is sharded). The rest of the randomness (Square's
        search) comes from ``self.generator``, reseeded with (seed, first index of the batch)."""
        self.sample_index = [int(i) for i in index]
        self._sample_generators = None  # made on first use: FGSM never draws
        self.generator.manual_seed(sample_seed(self.config.seed, self.sample_index[0]) if self.sample_index
                                   else self.config.seed)

    @property
    def sample_generators(self) -> list | None:
        import torch

        if self._sample_generators is None and self.sample_index is not None:
            self._sample_generators = [torch.Generator(device="cpu").manual_seed(sample_seed(self.config.seed, i))
                                       for i in self.sample_index]
        return self._sample_generators

    def rand(self, shape, rows=None, normal: bool = False):
        """Uniform [0, 1) (``normal``: standard normal) noise of ``shape`` = [n, ...], on the CPU: row r
        from the generator of the batch's sample ``rows[r]`` (all rows when None)."""
        import torch

        draw = torch.randn if normal else torch.rand
        if self.sample_generators is None:
            return draw(tuple(shape), generator=self.generator)
        gens = self.sample_generators if rows is None else [self.sample_generators[int(r)] for r in rows]
        return torch.stack([draw(tuple(shape[1:]), generator=g) for g in gens]) if gens else draw(tuple(shape))

    def __call__(self, x, y):
        return self.perturb(x, y)

    def perturb(self, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def target_schedule(self, x, y, min_classes: int, n_targets: int = 9):
        """AutoAttack's targeted schedule (APGD-T, FAB-T): for each of the ``n_targets`` classes with
        the highest clean logits after the top one (or the number of classes - 1 when that is
        smaller), and for each restart, the samples not yet fooled and their target class.

        Returns ``fooled`` (samples already misclassified; the caller marks the ones it fools) and a
        generator of ``(idx, target, restart)``; it stops early once every sample is fooled."""
        import torch

        with torch.no_grad():
            logits = self.model(x)
        classes = logits.shape[1]
        if classes < min_classes:
            raise CloakError(f"{getattr(self, 'name', type(self).__name__)} needs a model with at least "
                             f"{min_classes} classes, this one has {classes}; use apgd-ce")
        order = logits.argsort(dim=1, descending=True)
        fooled = logits.argmax(1) != y

        def runs():
            for k in range(1, min(n_targets, classes - 1) + 1):
                for restart in range(max(1, self.config.restarts)):
                    idx = (~fooled).nonzero().flatten()
                    if len(idx) == 0:
                        return
                    yield idx, order[idx, k], restart

        return fooled, runs()

    # helpers shared by the gradient attacks
    def project(self, x_adv, x):
        """Back into the eps ball around x (in the configured norm) and into the box."""
        import torch

        eps = self.config.eps
        delta = x_adv - x
        if self.config.norm == "linf":
            delta = delta.clamp(-eps, eps)
        else:
            norms = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (x.dim() - 1)))
            delta = delta * torch.clamp(eps / norms, max=1.0)
        return torch.clamp(x + delta, self.lo, self.hi)

    def step(self, grad, alpha):
        """The steepest-ascent direction for the norm, scaled by alpha."""
        if self.config.norm == "linf":
            return alpha * grad.sign()
        norms = grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * (grad.dim() - 1)))
        return alpha * grad / norms

    def input_grad(self, x_adv, y):
        import torch
        import torch.nn.functional as F

        x_adv = x_adv.detach().requires_grad_(True)
        loss = F.cross_entropy(self.model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        return grad

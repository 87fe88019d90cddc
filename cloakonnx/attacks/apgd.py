"""APGD (Croce & Hein, ICML 2020, "Reliable evaluation of adversarial robustness with an ensemble of
diverse parameter-free attacks"), in L-inf and L2, with the cross-entropy or the DLR loss.

PGD without a step size to tune (Algorithm 1 of the paper, as in github.com/fra31/auto-attack):

- start at a random point on the eps sphere (L-inf: scaled uniform noise whose largest entry is
  eps; L2: a Gaussian direction of norm eps), or at x when ``config.random_start`` is False;
- initial step size 2 * eps per sample; the first step is plain projected steepest ascent, later
  ones use momentum: ``x <- P(x + 0.75 (z - x) + 0.25 (x - x_prev))`` with ``z = P(x + eta * step)``;
- at the checkpoints ``w_j = ceil(p_j N)``, ``p_0 = 0, p_1 = 0.22,
  p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, a sample's step size is halved, and it restarts
  from its best point, when the loss went up in fewer than 75% of the steps since the last
  checkpoint, or when its step size was not halved at the last checkpoint and its best loss has not
  improved since;
- ``config.steps`` is N; ``config.restarts`` runs restart from new random points on the samples
  still correctly classified; ``config.step_size`` is not used.

Returned per sample: the latest misclassified iterate when any run fooled the model, else the
highest-loss point over all runs (so even an unbroken sample comes back perturbed, which is what
feature statistics need).
"""
from __future__ import annotations

import math

from ..errors import CloakError
from .base import Attack

LOSSES = ("ce", "dlr", "dlr-targeted")
MOMENTUM = 0.75  # alpha in the paper: weight of the new step
RHO = 0.75  # a step size is halved when the loss went up in fewer than RHO of the steps since the last check


def checkpoints(n_iter: int) -> list[int]:
    """The paper's checkpoints ``w_j = ceil(p_j * n_iter)`` (as iteration counts, 1-based)."""
    p_prev, p, out = 0.0, 0.22, []
    while p <= 1.0:
        w = math.ceil(p * n_iter - 1e-9)
        if w >= 1 and (not out or w > out[-1]):
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return out


def dlr_loss(logits, y):
    """Difference of Logits Ratio: ``-(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3)``, scale-invariant."""
    import torch

    z, _ = logits.sort(dim=1)
    u = torch.arange(len(y), device=logits.device)
    top_is_y = (logits.argmax(1) == y).float()
    z_y = logits[u, y]
    best_other = z[:, -2] * top_is_y + z[:, -1] * (1.0 - top_is_y)
    return -(z_y - best_other) / (z[:, -1] - z[:, -3] + 1e-12)


def dlr_targeted_loss(logits, y, target):
    """Targeted DLR (APGD-T): ``-(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)``; with 3 classes the
    denominator is ``z_pi1 - z_pi3``, as in the untargeted loss."""
    import torch

    z, _ = logits.sort(dim=1)
    u = torch.arange(len(y), device=logits.device)
    low = 0.5 * (z[:, -3] + z[:, -4]) if logits.shape[1] >= 4 else z[:, -3]
    return -(logits[u, y] - logits[u, target]) / (z[:, -1] - low + 1e-12)


class APGD(Attack):
    """APGD with ``loss="ce"`` (APGD-CE) or ``loss="dlr"`` (APGD-DLR, needs at least 3 classes)."""

    default_loss = "ce"
    name = "APGD"
    settings = ("steps", "random_start", "restarts")  # the step size adapts: --step-size is not used

    def __init__(self, model, config, bounds=(0.0, 1.0), loss: str | None = None):
        super().__init__(model, config, bounds)
        self.loss = loss or self.default_loss
        if self.loss not in LOSSES:
            raise CloakError(f"APGD loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")

    def _loss_and_grad(self, x_adv, y):
        """Per-sample losses, logits and the input gradient of their sum."""
        import torch
        import torch.nn.functional as F

        x_adv = x_adv.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x_adv)
            if self.loss != "ce" and logits.shape[1] < 3:
                raise CloakError(f"{self.name} needs a model with at least 3 classes, this one has "
                                 f"{logits.shape[1]}; use apgd-ce")
            if self.loss == "dlr":
                losses = dlr_loss(logits, y)
            elif self.loss == "dlr-targeted":
                losses = dlr_targeted_loss(logits, y, self.target)
            else:
                losses = F.cross_entropy(logits, y, reduction="none")
            (grad,) = torch.autograd.grad(losses.sum(), x_adv)
        return losses.detach(), logits.detach(), grad.detach()

    def _start(self, x, rows=None):
        cfg = self.config
        if not cfg.random_start:
            return x.clone()
        shape = (-1,) + (1,) * (x.dim() - 1)
        if cfg.norm == "linf":
            t = self.rand(x.shape, rows).to(x.device) * 2 - 1
            t = t / (t.abs().flatten(1).max(1).values.view(shape) + 1e-12)
        else:
            t = self.rand(x.shape, rows, normal=True).to(x.device)
            t = t / (t.flatten(1).norm(dim=1).view(shape) + 1e-12)
        return self.project(x + cfg.eps * t, x)

    def _run(self, x, y, rows=None):
        """One APGD run. Returns (x with the highest loss, its loss, fooled mask, latest fooling iterate)."""
        import torch

        n_iter = self.config.steps
        checks = set(checkpoints(n_iter))
        shape = (-1,) + (1,) * (x.dim() - 1)

        x_adv = self._start(x, rows)
        loss, logits, grad = self._loss_and_grad(x_adv, y)
        fooled = logits.argmax(1) != y
        x_fool = x_adv.clone()
        x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
        step_size = torch.full((len(x),), 2.0 * self.config.eps, device=x.device).view(shape)

        history = [loss]  # f(x^(0)), f(x^(1)), ...
        last_check, loss_best_last_check = 0, loss_best.clone()
        reduced_last_check = torch.ones(len(x), dtype=torch.bool, device=x.device)
        x_prev = x_adv.clone()
        for i in range(n_iter):
            with torch.no_grad():
                a = MOMENTUM if i > 0 else 1.0
                z = self.project(x_adv + self.step(grad, step_size), x)
                x_new = self.project(x_adv + a * (z - x_adv) + (1 - a) * (x_adv - x_prev), x)
                x_prev, x_adv = x_adv, x_new

            loss, logits, grad = self._loss_and_grad(x_adv, y)
            now = logits.argmax(1) != y
            x_fool[now] = x_adv[now]
            fooled |= now
            history.append(loss)
            up = loss > loss_best
            x_best[up], loss_best[up], grad_best[up] = x_adv[up], loss[up], grad[up]

            if i + 1 in checks:
                k = i + 1 - last_check
                increases = sum((history[t] > history[t - 1]).float() for t in range(last_check + 1, i + 2))
                oscillating = increases < RHO * k  # condition 1
                stalled = ~reduced_last_check & (loss_best <= loss_best_last_check)  # condition 2
                halve = oscillating | stalled
                if halve.any():
                    step_size[halve] /= 2.0
                    x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
                reduced_last_check, loss_best_last_check, last_check = halve, loss_best.clone(), i + 1
        return x_best, loss_best, fooled, x_fool

    def perturb(self, x, y):
        import torch

        x = x.detach()
        if self.config.eps == 0 or len(x) == 0:
            return x.clone()
        out = x.clone()
        best_loss = torch.full((len(x),), -float("inf"), device=x.device)
        fooled, runs = self._schedule(x, y)
        for idx, target, _ in runs:
            self.target = target
            self._keep_worst(x, y, idx, out, best_loss, fooled)
        return out.detach()

    def _schedule(self, x, y):
        """``restarts`` runs: the first on every sample, the others on the samples not yet fooled."""
        import torch

        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)

        def runs():
            for restart in range(max(1, self.config.restarts)):
                idx = (~fooled).nonzero().flatten() if restart else torch.arange(len(x), device=x.device)
                if len(idx) == 0:
                    return
                yield idx, None, restart

        return fooled, runs()

    def _keep_worst(self, x, y, idx, out, best_loss, fooled) -> None:
        """One run on the samples ``idx``; keep each one's fooling iterate, else its highest-loss point."""
        x_best, loss_best, now, x_fool = self._run(x[idx], y[idx], idx.tolist())
        better = (loss_best > best_loss[idx]) & ~now
        out[idx[better]] = x_best[better]
        best_loss[idx[better]] = loss_best[better]
        out[idx[now]] = x_fool[now]
        fooled[idx[now]] = True


class APGDDLR(APGD):
    """APGD with the DLR loss (robust to logit scaling); needs at least 3 classes."""

    default_loss = "dlr"
    name = "APGD-DLR"


class APGDT(APGD):
    """APGD-T (AutoAttack's targeted APGD): the targeted DLR loss towards each of the ``n_targets``
    classes with the highest clean logits after the top one (9, or the number of classes - 1 when
    that is smaller), one run per target and restart, each on the samples not yet fooled.

    Samples the model already misclassifies come back unchanged. Needs at least 3 classes."""

    default_loss = "dlr-targeted"
    name = "APGD-T"
    n_targets = 9

    def _schedule(self, x, y):
        return self.target_schedule(x, y, min_classes=3, n_targets=self.n_targets)

"""FAB (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples with a fast adaptive
boundary attack") in L-inf and L2: targeted FAB-T (AutoAttack's standard set) and untargeted FAB
(its plus set).

Each step linearises the decision boundary between the true class y and a target class t at the
current point, and projects both the current point and the original onto that hyperplane (inside
the box): minimal-norm steps found in closed form (L-inf: a sorted piecewise-linear search; L2: a
bisection on the Lagrange multiplier). The new point is a convex combination of the two
projections, biased towards the original by ``alpha`` (at most ``ALPHA_MAX``) and extrapolated by
``ETA``. When a point crosses the boundary it is kept if it is the closest so far, and pulled back
towards the original by ``BETA`` to search for a smaller perturbation.

As in AutoAttack, FAB-T's targets are the classes with the highest clean logits after the top one
(9, or the number of classes - 1), one run each on the samples not yet fooled within eps. Untargeted
FAB instead linearises, at every step, the boundary to the class that looks closest (the smallest
|f_k - f_y| / ||grad (f_k - f_y)||, dual norm), which needs the whole Jacobian: one backward pass per
class. A sample counts as fooled only when its perturbation is at most eps.
"""
from __future__ import annotations

from ..errors import CloakError
from .base import Attack

ALPHA_MAX, ETA, BETA = 0.1, 1.05, 0.9


def project_linf(p, w, b):
    """Per row, the smallest L-inf step ``d`` with ``w . (p + d) = b`` and ``p + d`` in [0, 1]
    (the largest step towards the plane when the box does not reach it)."""
    import torch

    c = b - (w * p).sum(1)
    direction = torch.sign(c)[:, None] * torch.sign(w)
    room = torch.where(direction > 0, 1 - p, p).clamp_min(0)
    order = room.argsort(1)
    r, a = room.gather(1, order), w.abs().gather(1, order)
    before = (a * r).cumsum(1) - a * r  # sum of a_j r_j for j < k
    after = a.flip(1).cumsum(1).flip(1)  # sum of a_j for j >= k
    reach = before + r * after  # g(r_k): how far w . z moves with the step capped at r_k
    need = c.abs()[:, None]
    k = (reach < need).sum(1, keepdim=True).clamp_max(p.shape[1] - 1)
    t = (need - before.gather(1, k)) / after.gather(1, k).clamp_min(1e-12)
    t = torch.where(reach[:, -1:] < need, torch.full_like(t, float("inf")), t)
    return direction * torch.minimum(t, room)


def project_l2(p, w, b, iters: int = 40):
    """Per row, the smallest L2 step ``d`` with ``w . (p + d) = b`` and ``p + d`` in [0, 1]:
    ``d = clip(lambda * w)`` with lambda found by bisection (the largest step when unreachable)."""
    import torch

    c = (b - (w * p).sum(1))[:, None]
    lo_box, hi_box = -p, 1 - p
    sign = torch.sign(c)
    lo = torch.zeros_like(c)
    hi = torch.full_like(c, 1.0)
    for _ in range(60):  # grow hi until the plane is reached or the box saturates
        moved = (torch.clamp(sign * hi * w, lo_box, hi_box) * w).sum(1, keepdim=True)
        grow = (moved.abs() < c.abs()) & (hi < 1e12)
        if not grow.any():
            break
        hi = torch.where(grow, hi * 4, hi)
    for _ in range(iters):
        mid = (lo + hi) / 2
        moved = (torch.clamp(sign * mid * w, lo_box, hi_box) * w).sum(1, keepdim=True)
        short = moved.abs() < c.abs()
        lo, hi = torch.where(short, mid, lo), torch.where(short, hi, mid)
    return torch.clamp(sign * hi * w, lo_box, hi_box)


class FABBase(Attack):
    """What FAB and FAB-T share: the projection steps of one run, and keeping the closest adversarial
    point within eps. A subclass says which boundary each step linearises (``_diff_and_grad``) and
    which runs to make (``schedule``)."""

    settings = ("steps", "restarts")  # restarts after the first start at random points

    def _diff_and_grad(self, x, y, target):  # pragma: no cover - abstract
        raise NotImplementedError

    def schedule(self, x, y):  # pragma: no cover - abstract
        raise NotImplementedError

    def _norm(self, d):
        return d.abs().amax(1) if self.config.norm == "linf" else d.norm(dim=1)

    def _run(self, x, y, target, random_start: bool, rows=None):
        """One FAB run: the closest adversarial point found per sample, and its distance (inf if none)."""
        import torch

        n = len(x)
        flat = x.reshape(n, -1)
        x1 = flat.clone()
        if random_start:
            t = self.rand(flat.shape, rows).to(x.device) * 2 - 1
            x1 = (flat + 0.5 * self.config.eps * t / t.abs().amax(1, keepdim=True).clamp_min(1e-12)).clamp(
                self.lo, self.hi)
        best = flat.clone()
        best_dist = torch.full((n,), float("inf"), device=x.device)
        project = project_linf if self.config.norm == "linf" else project_l2
        width = self.hi - self.lo
        for _ in range(self.config.steps):
            diff, grad, _ = self._diff_and_grad(x1.reshape(x.shape), y, target)
            w = grad.reshape(n, -1)
            b = (w * x1).sum(1) - diff  # the linearised boundary: w . z = b
            # the box is [lo, hi]: project in [0, 1] coordinates
            d = project(torch.cat(((x1 - self.lo) / width, (flat - self.lo) / width)), torch.cat((w, w)) * width,
                        torch.cat((b, b)) - (torch.cat((w, w)) * self.lo).sum(1)) * width
            d1, d2 = d[:n], d[n:]
            a1, a2 = self._norm(d1), self._norm(d2)
            alpha = (a1 / (a1 + a2).clamp_min(1e-12)).clamp(0, ALPHA_MAX)[:, None]
            x1 = ((x1 + ETA * d1) * (1 - alpha) + (flat + ETA * d2) * alpha).clamp(self.lo, self.hi)
            with torch.no_grad():
                fooled = self.model(x1.reshape(x.shape)).argmax(1) != y
            if fooled.any():
                dist = self._norm(x1 - flat)
                closer = fooled & (dist < best_dist)
                best[closer], best_dist[closer] = x1[closer], dist[closer]
                x1 = torch.where(fooled[:, None], (x1 - flat) * BETA + flat, x1)
        return best.reshape(x.shape), best_dist

    def perturb(self, x, y):
        x = x.detach()
        if self.config.eps == 0 or len(x) == 0:
            return x.clone()
        out = x.clone()
        fooled, runs = self.schedule(x, y)
        for idx, target, restart in runs:
            adv, dist = self._run(x[idx], y[idx], target, random_start=restart > 0, rows=idx.tolist())
            now = dist <= self.config.eps * (1 + 1e-6)
            out[idx[now]] = adv[now]
            fooled[idx[now]] = True
        return out.detach()


class FABT(FABBase):
    """Targeted FAB (AutoAttack's FAB-T). ``config.steps`` iterations per target; ``restarts`` > 1
    adds runs from random starts around the original."""

    name = "FAB-T"
    n_targets = 9

    def _diff_and_grad(self, x, y, target):
        """f_target - f_y and its input gradient, per sample."""
        import torch

        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = self.model(x)
            u = torch.arange(len(y), device=x.device)
            diff = logits[u, target] - logits[u, y]
            (grad,) = torch.autograd.grad(diff.sum(), x)
        return diff.detach(), grad.detach(), logits.detach()

    def schedule(self, x, y):
        """``fooled`` and the ``(idx, target, restart)`` runs: AutoAttack's targeted schedule."""
        return self.target_schedule(x, y, min_classes=2, n_targets=self.n_targets)


class FAB(FABBase):
    """Untargeted FAB (AutoAttack's plus set): ``restarts`` runs on the samples not yet fooled, the
    first from the original point, the others from random starts."""

    name = "FAB"

    def _diff_and_grad(self, x, y, target):
        """For the class k != y with the nearest linearised boundary: f_k - f_y and its gradient."""
        import torch

        x = x.detach().requires_grad_(True)
        u = torch.arange(len(y), device=x.device)
        with torch.enable_grad():
            logits = self.model(x)
            classes = logits.shape[1]
            grads = []
            for k in range(classes):  # the Jacobian, one class at a time
                (g,) = torch.autograd.grad(logits[:, k].sum(), x, retain_graph=k < classes - 1)
                grads.append(g.reshape(len(y), -1))
        jac = torch.stack(grads, 1)  # n, classes, d
        logits = logits.detach()
        diff = logits - logits[u, y][:, None]
        dgrad = jac - jac[u, y][:, None]
        dual = dgrad.abs().sum(2) if self.config.norm == "linf" else dgrad.norm(dim=2)
        ratio = diff.abs() / (dual + 1e-12)
        ratio[u, y] = float("inf")
        k = ratio.argmin(1)
        return diff[u, k], dgrad[u, k].reshape(x.shape), logits

    def schedule(self, x, y):
        import torch

        with torch.no_grad():
            logits = self.model(x)
        if logits.shape[1] < 2:
            raise CloakError(f"FAB needs a model with at least 2 classes, this one has {logits.shape[1]}")
        fooled = logits.argmax(1) != y

        def runs():
            for restart in range(max(1, self.config.restarts)):
                idx = (~fooled).nonzero().flatten()
                if len(idx) == 0:
                    return
                yield idx, None, restart

        return fooled, runs()

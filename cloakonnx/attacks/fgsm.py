"""FGSM (Goodfellow et al., 2015): one signed-gradient step of size eps; the DeepCloak paper's attack."""
from __future__ import annotations

from .base import Attack


class FGSM(Attack):
    def perturb(self, x, y):
        grad = self.input_grad(x, y)
        return self.project(x + self.step(grad, self.config.eps), x).detach()

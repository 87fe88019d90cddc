"""PGD (Madry et al., 2018) in L-inf or L2, with random start and restarts keeping the worst case."""
from __future__ import annotations

from .base import Attack


class PGD(Attack):
    settings = ("steps", "step_size", "random_start", "restarts")

    def perturb(self, x, y):
        import torch

        cfg = self.config
        best = x.clone()
        fooled = torch.zeros(len(x), dtype=torch.bool, device=x.device)
        for _ in range(max(1, cfg.restarts)):
            x_adv = x.clone()
            if cfg.random_start and cfg.eps > 0:
                noise = self.rand(x.shape).to(x.device) * 2 - 1
                if cfg.norm == "l2":
                    noise = noise / noise.flatten(1).norm(dim=1).view(-1, *([1] * (x.dim() - 1))).clamp_min(1e-12)
                    noise = noise * self.rand((len(x),)).to(x.device).view(-1, *([1] * (x.dim() - 1)))
                x_adv = self.project(x + cfg.eps * noise, x)
            for _ in range(cfg.steps):
                x_adv = self.project(x_adv + self.step(self.input_grad(x_adv, y), cfg.alpha), x).detach()
            if cfg.restarts <= 1:
                return x_adv.detach()
            with torch.no_grad():
                now = self.model(x_adv).argmax(1) != y
            take = now & ~fooled
            best[take] = x_adv[take]
            fooled |= now
        return best.detach()

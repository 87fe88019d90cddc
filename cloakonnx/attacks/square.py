"""Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020): score-based and gradient-free.

Random search over square-shaped updates, accepted when the margin loss
``logit_y - max_{k != y} logit_k`` goes down, in L-inf or L2. It only reads logits, so it also
attacks models that are not differentiable (an onnxruntime session wrapped in a callable) and
checks that a mask does not merely hide gradients.

Faithful to the paper and its reference code (github.com/max-andr/square-attack):

- L-inf starts from vertical stripes of +-eps (one random sign per column and channel); each
  trial redraws one square window (one random sign per channel) and resamples the sign when the
  window would not change the image.
- L2 starts from a grid of pseudo-Gaussian bumps scaled onto the eps sphere; each trial moves the
  mass of a second window into the first one and adds a fresh +-bump there.
- The square side follows the paper's piecewise-constant schedule for ``p`` (the fraction of pixels
  changed), scaled to the query budget as in the reference code.
- Every sample stops being queried as soon as it is misclassified; each iteration is one batched
  model call on the samples still correctly classified.

Two deliberate differences from the reference code: window corners are drawn from the paper's
``{0, ..., h - s}`` (the code's ``randint(0, h - s)`` never touches the last row and column), and
each image gets its own window (the L2 code shares one per batch).

Budget: ``config.queries`` forward passes per sample, *including* the first one on the clean input
(the paper does not count that one). Samples the model already gets wrong are returned unchanged.
"""
from __future__ import annotations

import contextlib
import math

from ..errors import CloakError
from .base import Attack


def p_selection(p_init: float, it: int, n_iters: int) -> float:
    """The paper's schedule for ``p``: halved at iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000
    and 8000 of a 10,000-query run, the breakpoints scaled to ``n_iters``."""
    it = int(it / n_iters * 10000)
    for bound, div in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128),
                       (8000, 256)):
        if it <= bound:
            return p_init / div
    return p_init / 512


def _bump_rectangle(rows: int, cols: int):
    """Sum of nested rectangles weighted 1/(k+1)^2 around the centre: the pseudo-Gaussian bump."""
    import torch

    delta = torch.zeros(rows, cols)
    if rows == 0 or cols == 0:
        return delta
    r, c = rows // 2, cols // 2  # top-left of the innermost rectangle
    for k in range(max(rows // 2 + 1, cols // 2 + 1)):
        delta[max(r, 0) : min(r + 2 * k + 1, rows), max(c, 0) : min(c + 2 * k + 1, cols)] += 1.0 / (k + 1) ** 2
        r, c = r - 1, c - 1
    return delta / delta.square().sum().sqrt()


@contextlib.contextmanager
def _threads(n: int | None):
    """Run the block with torch on ``n`` intra-op threads (None: leave it as it is)."""
    import torch

    before = torch.get_num_threads()
    if n is None or n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Square(Attack):
    """Square Attack in L-inf or L2; ``p_init`` defaults to the paper's 0.05 (L-inf) and 0.1 (L2).

    After a call, ``queries_used`` holds the forward passes spent on each sample and ``model_calls``
    the number of (batched) model calls.
    """

    needs_gradients = False
    settings = ("queries",)
    # Square's own work is a dozen tiny elementwise tensor ops per query. On CPU, torch's thread pool
    # costs more than it saves on them and competes with onnxruntime's threads for the same cores,
    # so the search runs them on one thread; the model calls keep the caller's setting.
    search_threads: int | None = 1

    def __init__(self, model, config, bounds=(0.0, 1.0), p_init: float | None = None):
        super().__init__(model, config, bounds)
        if config.queries < 2:
            raise CloakError(f"--queries must be at least 2 for the Square attack (one clean query, then one per "
                             f"trial), got {config.queries}")
        self.p_init = p_init if p_init is not None else (0.05 if config.norm == "linf" else 0.1)
        if not 0 < self.p_init <= 1:
            raise CloakError(f"Square attack p_init must be in (0, 1], got {self.p_init:g}")
        self.queries_used = None
        self.model_calls = 0
        self._caller_threads: int | None = None

    # -- model access: forward passes only, no autograd, counted ------------------------------------------------
    def _margin(self, x, y, idx=None):
        """``logit_y - max_{k != y} logit_k`` for a batch: positive while correctly classified."""
        import torch

        with torch.no_grad(), _threads(self._caller_threads):
            logits = self.model(x)
            if not isinstance(logits, torch.Tensor):
                logits = torch.as_tensor(logits)
            logits = logits.detach().to(device=x.device, dtype=torch.float32)
        self.model_calls += 1
        if idx is None:
            self.queries_used += 1
        else:
            self.queries_used[idx] += 1
        u = torch.arange(len(y), device=x.device)
        true = logits[u, y]
        other = logits.clone()
        other[u, y] = -float("inf")
        return true - other.max(1).values

    # -- randomness, all from self.generator --------------------------------------------------------------------
    def _signs(self, shape, device):
        import torch

        return (torch.randint(0, 2, shape, generator=self.generator) * 2 - 1).float().to(device)

    def _corners(self, n, h, w, s, device):
        import torch

        vh = torch.randint(0, h - s + 1, (n,), generator=self.generator).to(device)
        vw = torch.randint(0, w - s + 1, (n,), generator=self.generator).to(device)
        return vh, vw

    def _bump(self, s):
        """The reference code's ``meta_pseudo_gaussian_pert``: +bump over -bump, randomly transposed."""
        import torch

        delta = torch.cat([_bump_rectangle(s // 2, s), -_bump_rectangle(s - s // 2, s)])
        delta = delta / delta.square().sum().sqrt()
        if torch.rand(1, generator=self.generator).item() > 0.5:
            delta = delta.t()
        return delta

    @staticmethod
    def _window_mask(vh, vw, s, h, w):
        """Bool [n, 1, h, w]: True inside each image's s x s window."""
        import torch

        rows = torch.arange(h, device=vh.device)
        cols = torch.arange(w, device=vh.device)
        in_r = (rows >= vh[:, None]) & (rows < vh[:, None] + s)
        in_c = (cols >= vw[:, None]) & (cols < vw[:, None] + s)
        return (in_r[:, :, None] & in_c[:, None, :])[:, None]

    @staticmethod
    def _window_index(vh, vw, s, c):
        """Advanced-index tuple selecting each image's [c, s, s] window out of [n, c, h, w]."""
        import torch

        n, dev = len(vh), vh.device
        ar = torch.arange(s, device=dev)
        return (torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                (vh[:, None] + ar)[:, None, :, None], (vw[:, None] + ar)[:, None, None, :])

    # -- the attack ----------------------------------------------------------------------------------------------
    def perturb(self, x, y):
        import torch

        if x.dim() != 4:
            raise CloakError(f"the Square attack needs image inputs [N, C, H, W], got shape {tuple(x.shape)}")
        x = x.detach()
        self._caller_threads = torch.get_num_threads()
        self.queries_used = torch.zeros(len(x), dtype=torch.long, device=x.device)
        self.model_calls = 0
        best = x.clone()
        if len(x) == 0:
            return best
        margin = self._margin(x, y)
        todo = (margin > 0).nonzero().flatten()  # the paper attacks correctly classified points only
        if self.config.eps == 0 or len(todo) == 0:
            return best
        run = self._linf if self.config.norm == "linf" else self._l2
        with _threads(self.search_threads if x.device.type == "cpu" else None):
            best[todo] = run(x[todo], y[todo], todo)
        return best.detach()

    def _search(self, x, y, idx, x_best, propose):
        """The shared random search: ``propose(i, x, x_best) -> x_new`` for the still-correct samples."""
        import torch

        margin_min = self._margin(x_best, y, idx)
        for i in range(self.config.queries - 2):
            act = (margin_min > 0).nonzero().flatten()
            if len(act) == 0:
                break
            x_new = propose(i, x[act], x_best[act])
            margin = self._margin(x_new, y[act], idx[act])
            better = margin < margin_min[act]
            margin_min[act] = torch.where(better, margin, margin_min[act])
            x_best[act] = torch.where(better.view(-1, 1, 1, 1), x_new, x_best[act])
        return x_best

    def _linf(self, x, y, idx):
        import torch

        eps, lo, hi = self.config.eps, self.lo, self.hi
        n, c, h, w = x.shape
        x_best = torch.clamp(x + eps * self._signs((n, c, 1, w), x.device), lo, hi)  # vertical stripes

        def propose(i, xc, xb):
            m = len(xc)
            p = p_selection(self.p_init, i, self.config.queries)
            s = min(max(int(round(math.sqrt(p * h * w))), 1), max(min(h, w) - 1, 1))
            vh, vw = self._corners(m, h, w, s, xc.device)
            win = self._window_mask(vh, vw, s, h, w)
            deltas = xb - xc
            redo = torch.ones(m, dtype=torch.bool, device=xc.device)
            for _ in range(100):  # resample the sign until the window really changes (as the reference code)
                signs = self._signs((m, c, 1, 1), xc.device)
                deltas = torch.where(win & redo.view(-1, 1, 1, 1), eps * signs, deltas)
                x_new = torch.clamp(xc + deltas, lo, hi)
                same = ((x_new - xb).abs() < 1e-7) | ~win
                redo = same.flatten(1).all(1)
                if not redo.any():
                    break
            return x_new

        return self._search(x, y, idx, x_best, propose)

    def _l2(self, x, y, idx):
        import torch

        eps, lo, hi = self.config.eps, self.lo, self.hi
        n, c, h, w = x.shape

        def on_sphere(xc, delta):
            norm = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            return torch.clamp(xc + delta / (norm + 1e-12) * eps, lo, hi)

        # a grid of pseudo-Gaussian bumps with random signs, scaled onto the eps sphere
        s0 = max(min(h, w) // 5, 1)
        delta0 = torch.zeros_like(x)
        vh = max((h - 5 * s0) // 2, 0)
        for _ in range(h // s0):
            vw = max((w - 5 * s0) // 2, 0)
            for _ in range(w // s0):
                bump = self._bump(s0).to(x.device)[: max(0, h - vh), : max(0, w - vw)]
                if bump.numel():
                    r, q = bump.shape
                    delta0[:, :, vh : vh + r, vw : vw + q] += bump * self._signs((n, c, 1, 1), x.device)
                vw += s0
            vh += s0
        x_best = on_sphere(x, delta0)

        def propose(i, xc, xb):
            m = len(xc)
            p = p_selection(self.p_init, i, self.config.queries)
            s = max(int(round(math.sqrt(p * h * w))), 3)
            s = min(s + 1 if s % 2 == 0 else s, h, w)
            delta = xb - xc
            vh1, vw1 = self._corners(m, h, w, s, xc.device)
            vh2, vw2 = self._corners(m, h, w, s, xc.device)
            w1 = self._window_index(vh1, vw1, s, c)
            w2 = self._window_index(vh2, vw2, s, c)
            both = self._window_mask(vh1, vw1, s, h, w) | self._window_mask(vh2, vw2, s, h, w)
            norm_image = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            norm_windows = (delta * both).square().sum((2, 3), keepdim=True).sqrt()  # [m, c, 1, 1]
            old = delta[w1]
            old = old / (old.square().sum((2, 3), keepdim=True).sqrt() + 1e-12)
            new = self._bump(s).to(xc.device) * self._signs((m, c, 1, 1), xc.device) + old
            budget = (torch.clamp(eps**2 - norm_image**2, min=0) / c + norm_windows**2).sqrt()
            new = new / (new.square().sum((2, 3), keepdim=True).sqrt() + 1e-12) * budget
            delta[w2] = 0.0  # move window 2's mass ...
            delta[w1] = new  # ... into window 1, with a fresh bump
            return on_sphere(xc, delta)

        return self._search(x, y, idx, x_best, propose)


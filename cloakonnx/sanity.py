"""evaluate's sanity checks: signs that an evaluation is unreliable (masked gradients, a broken
attack, a random model), one documented function each, as auto-attack's ``checks.py`` has them.

Each check returns ``{"name", "ok", "detail"}``; a failed check marks the report unreliable. The
checks on results follow Carlini et al. 2019 ("On Evaluating Adversarial Robustness"); the checks on
the model are AutoAttack's automatic ones.

| check | fails when |
|---|---|
| accuracy falls as eps grows | an attack's accuracy rises with eps (beyond one sample + 1%) |
| no attack beats clean accuracy | an attack leaves more samples correct than no attack |
| white-box is no weaker than transfer or gradient-free | a transfer or gradient-free attack beats the white-box one |
| the same input gives the same output | onnxruntime answers twice differently (a random model) |
| input gradients are non-zero | some samples have an exactly zero input gradient |
| a large eps brings accuracy to about chance | PGD at half the box leaves accuracy above chance + 10% |
"""
from __future__ import annotations

import numpy as np

from .attacks import AttackConfig
from .data import Dataset
from .runner import Runner
from .runtime import run_batch


def tolerance(n: int) -> float:
    """One sample, plus one point: differences below this are noise."""
    return 1.0 / max(n, 1) + 0.01


def check(name: str, problems: list[str], ok_detail: str = "ok", sep: str = ", ", prefix: str = "") -> dict:
    return {"name": name, "ok": not problems, "detail": prefix + sep.join(problems) if problems else ok_detail}


def accuracy_falls_with_eps(results: list[dict], tol: float) -> dict:
    """A stronger budget never helps the model: for each attack and threat, accuracy must not rise
    with eps. A rise hints at gradient masking or a broken attack."""
    series: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in results:
        series.setdefault((r["attack"], r["threat"]), []).append((r["eps"], r["accuracy"]))
    bad = [f"{a} ({t})" for (a, t), pts in series.items()
           if any(b[1] > a_[1] + tol for a_, b in zip(sorted(pts), sorted(pts)[1:]))]
    return check("accuracy falls as eps grows", bad, "monotone for every attack", prefix="rises with eps for ")


def no_attack_beats_clean(results: list[dict], clean: float, tol: float) -> dict:
    """An attack can only lower accuracy: a row above the clean accuracy is a bug."""
    above = [f"{r['attack']} ({r['threat']}) eps={r['eps']:g}" for r in results if r["accuracy"] > clean + tol]
    return check("no attack beats clean accuracy", above)


def white_box_strongest(results: list[dict], clean: float, tol: float, cumulative: bool) -> dict:
    """A white-box attack on the model itself should be the strongest: when a transfer or
    gradient-free attack breaks more, the gradients the white-box attack saw were misleading.
    With cumulative rows (presets) this is AutoAttack's check: a non-adaptive attack must not
    break many points that the white-box attacks before it left robust."""
    weaker = []
    for eps in sorted({r["eps"] for r in results}):
        here = [r for r in results if r["eps"] == eps]
        if cumulative:
            previous = clean
            for r in here:
                if r["threat"] != "adaptive" and previous - r["accuracy"] > tol:
                    weaker.append(f"eps={eps:g}: {r['threat']} {r['attack']} broke {100 * (previous - r['accuracy']):.1f}% "
                                  "more that the white-box attacks before it did not")
                previous = r["accuracy"]
            continue
        white = [r["accuracy"] for r in here if r["threat"] == "adaptive"]
        for r in (r for r in here if r["threat"] != "adaptive"):
            if white and min(white) > r["accuracy"] + tol:
                weaker.append(f"eps={eps:g}: white-box {100 * min(white):.1f}% > {r['threat']} "
                              f"{r['attack']} {100 * r['accuracy']:.1f}%")
    return check("white-box is no weaker than transfer or gradient-free", weaker, sep="; ")


def sanity_checks(results: list[dict], robust: dict, clean: float, n: int, cumulative: bool = False) -> list[dict]:
    """The checks on the results (``robust`` is kept for the API; the rows carry what they need)."""
    tol = tolerance(n)
    return [accuracy_falls_with_eps(results, tol), no_attack_beats_clean(results, clean, tol),
            white_box_strongest(results, clean, tol, cumulative)]


def same_output_twice(runner: Runner, x: np.ndarray) -> dict:
    """The model is deterministic: the same input gives the same output (AutoAttack's check for
    randomised defences, which need EOT attacks instead)."""
    first, second = (run_batch(runner.session, runner.feed(x), [runner.logits])[0] for _ in range(2))
    same = bool(np.array_equal(first, second))
    return {"name": "the same input gives the same output", "ok": same,
            "detail": "ok" if same else "onnxruntime outputs differ between two runs"}


def nonzero_gradients(runner: Runner, x: np.ndarray, y: np.ndarray, batch: int) -> dict:
    """No sample has an exactly zero input gradient (``batch`` at a time: a large model's activations
    add up). Zero gradients mean masked gradients, or a model saturated on those samples."""
    import torch
    import torch.nn.functional as F

    zeros = 0
    for s in range(0, len(x), batch):
        xt = torch.from_numpy(x[s : s + batch]).to(runner.device).requires_grad_(True)
        yt = torch.from_numpy(y[s : s + batch]).to(runner.device)
        (grad,) = torch.autograd.grad(F.cross_entropy(runner.torch_model(xt), yt, reduction="sum"), xt)
        zeros += int((grad.flatten(1).abs().amax(1) == 0).sum())
    zero = zeros / len(x)
    return {"name": "input gradients are non-zero", "ok": zero == 0.0,
            "detail": "ok" if zero == 0 else f"{100 * zero:.1f}% of samples have an exactly zero input "
                                             "gradient (masked gradients, or a model saturated on them)"}


def model_checks(runner: Runner, ds: Dataset, batch: int = 32) -> list[dict]:
    """AutoAttack's automatic checks on the model itself, on the first 200 samples."""
    x = ds.x[:200]
    checks = [same_output_twice(runner, x)]
    if runner.torch_model is not None:
        checks.append(nonzero_gradients(runner, x, ds.y[: len(x)], batch))
    return checks


def large_eps_reaches_chance(backend, runner: Runner, ds: Dataset, norm: str, bounds: tuple[float, float],
                             seed: int, batch_size: int | None, device: str, n_classes: int) -> dict:
    """At a budget that covers half the box, a working attack brings accuracy to about chance
    (PGD-20 on the first 200 samples); if not, the attack is not reaching the model."""
    width = bounds[1] - bounds[0]
    sub = ds.subset(np.arange(min(len(ds), 200)))
    eps = 0.5 * width if norm == "linf" else 0.5 * width * float(np.sqrt(np.prod(ds.x.shape[1:])))
    cfg = AttackConfig(name="pgd", eps=eps, norm=norm, steps=20, seed=seed, batch_size=batch_size)
    batch = runner.attack_batch(batch_size, "pgd", sub.x.shape[1:]).size
    adv = backend.craft(runner, cfg, sub, device, "sanity: large eps", batch)
    acc = float((runner.predict(adv) == sub.y).mean())
    chance = 1.0 / max(n_classes, 1)
    return {"name": "a large eps brings accuracy to about chance", "ok": acc <= chance + 0.1,
            "detail": f"PGD at eps={eps:g}: {100 * acc:.1f}% (chance {100 * chance:.1f}%)"}

"""How strongly to apply what was learned, chosen on validation against the adaptive attacker.

Learned masks and fine-tuned weights both come with a continuous path from the original (strength
0) to the learned result (strength 1): m_a = 1 - a (1 - m) for a mask, w_a = w0 + a (w - w0) for
weights. Each candidate strength is written into the graph and measured on the validation split
through onnxruntime: clean, and against the run's attack crafted on that candidate (adaptive: the
attacker knows the mask or the new weights). The best adaptive accuracy within the clean-accuracy
budget wins; ties go to the weaker change. Transfer accuracy is not used: a mask can defeat inputs
crafted on the original while making the model easier to attack directly.

Then the chosen candidate must beat the original under a second, stronger attack (APGD-CE, at least
20 steps), worst case per sample over both attacks: "no gain, no change", judged adaptively.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import numpy as np
import onnx

from .attacks import AttackConfig
from .config import MaskConfig
from .curve import choose_point, clean_drop_bound, validation_needed
from .data import Dataset
from .pipeline import Prepared
from .runner import Runner
from .runtime import run_batch
from .search import Baseline

log = logging.getLogger(__name__)

STRENGTHS = (0.1, 0.25, 0.5, 0.75, 1.0)  # candidates besides 0 (the original)
GUARD_STEPS = 20  # APGD-CE steps of the final check against the original
SLOW_S = 20.0  # past this many seconds of choosing, each strength measured is logged


@dataclass
class StrengthPoint:
    """A candidate strength measured on validation (the fields ``curve.choose_point`` reads)."""

    alpha: float
    clean_accuracy: float
    adversarial_accuracy: float  # adaptive: crafted on this candidate
    clean_drop_bound: float
    median_margin: float | None = None  # top-1 minus top-2 logit on clean validation: shrinking logits show here

    @property
    def size(self) -> float:
        """What the choice prefers less of among equally good candidates: the move from the original."""
        return self.alpha

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Strength:
    """The outcome: the chosen point (None: keep the original), every point, the budget used, the
    chosen model's Runner and survival bits, and the final check's figures."""

    chosen: StrengthPoint | None
    points: list[StrengthPoint]
    budget: float
    runner: Runner | None = None
    survived: np.ndarray | None = None  # per validation sample, under the selection attack
    guard: dict | None = None
    bound_note: str | None = None  # when the confidence bound, not the budget itself, held a better point back


def choose_strength(p: Prepared, config: MaskConfig, base: Baseline, build: Callable[[float], onnx.ModelProto],
                    what: str) -> Strength:
    """Measure ``build(alpha)`` for each candidate strength; the best adaptive accuracy within the
    clean budget, None when none beats the original's (``base``: its transfer set is its adaptive one)."""
    budget, confidence, bs, y = config.selection_budget(), config.budget_confidence, config.ort_batch_size, p.val.y
    before = p.runner.predict(p.val.x, bs) == y
    points = [StrengthPoint(0.0, base.clean, base.adv_accuracy, 0.0, median_margin(p.runner, p.val, bs))]
    runners, survived, broken, start = {}, {}, {0.0: 0}, time.perf_counter()
    for alpha in STRENGTHS:
        runner = p.runner_for(build(alpha), config)
        correct = runner.predict(p.val.x, bs) == y
        broken[alpha] = int((before & ~correct).sum())
        adv = p.adversarial(runner, p.val, f" validation ({what} at strength {alpha:g}, adaptive)")
        survived[alpha] = runner.predict(adv, bs) == y
        runners[alpha] = runner
        points.append(StrengthPoint(alpha, float(correct.mean()), float(survived[alpha].mean()),
                                    clean_drop_bound(before, correct, confidence or 0.9),
                                    median_margin(runner, p.val, bs)))
        spent = time.perf_counter() - start  # a progress line once the choice is slow (PP-LCNet: 15 minutes)
        log.log(logging.INFO if spent > SLOW_S else logging.DEBUG, "%s at strength %g: clean %.1f%%, adaptive "
                "%.1f%% on validation (%.0f s)", what, alpha, 100 * points[-1].clean_accuracy,
                100 * points[-1].adversarial_accuracy, spent)
    best = choose_point(points, base.clean, budget, use_bound=bool(confidence), floor=base.adv_accuracy)
    note = bound_note(points, broken, base, budget, confidence, best, len(y))
    if best is None:
        log.info("no strength of the %s improves adaptive accuracy on validation within the %g-point clean "
                 "budget: nothing is changed", what, budget)
        return Strength(None, points, budget, bound_note=note)
    return Strength(best, points, budget, runners[best.alpha], survived[best.alpha], bound_note=note)


def bound_note(points: list[StrengthPoint], broken: dict, base: Baseline, budget: float, confidence: float,
               best: StrengthPoint | None, n: int) -> str | None:
    """When the confidence bound, not the point estimate, held back a stronger point: say what it
    would have bought, and how many validation samples would let the bound admit it."""
    if not confidence:
        return None
    estimate = choose_point(points, base.clean, budget, use_bound=False, floor=base.adv_accuracy)
    if estimate is None or (best is not None and estimate.alpha == best.alpha):
        return None
    needed = validation_needed(budget, confidence, broken[estimate.alpha])
    text = (f"strength {estimate.alpha:g} would reach {100 * estimate.adversarial_accuracy:.1f}% adaptive accuracy on "
            f"validation, but it breaks {broken[estimate.alpha]} correct prediction(s) of {n}, and the clean drop's "
            f"{100 * confidence:g}% bound, {estimate.clean_drop_bound:.2f} points, is over the {budget:g}-point budget")
    if needed is not None:
        text += f"; about {needed} validation samples would let a change breaking as many pass"
    log.warning("%s (more data, --max-clean-drop or --budget-confidence 0 admit it)", text)
    return text


def median_margin(runner: Runner, ds: Dataset, batch_size: int = 256) -> float:
    """The median gap between the two largest logits on ``ds``, through onnxruntime: a change that
    merely shrinks the logits (lowering the loss on adversarial inputs without fixing them) shows here."""
    margins = []
    for s in range(0, len(ds), batch_size):
        (out,) = run_batch(runner.session, runner.feed(ds.x[s : s + batch_size]), [runner.logits])
        top = np.sort(out.reshape(len(out), -1).astype(np.float64), axis=1)[:, -2:]
        margins.append(top[:, 1] - top[:, 0])
    return float(np.median(np.concatenate(margins))) if margins else float("nan")


def guard_attack(attack: AttackConfig) -> AttackConfig:
    """The final check's attacker: APGD-CE with the run's budget, at least ``GUARD_STEPS`` steps."""
    return replace(attack, name="apgd-ce", steps=max(GUARD_STEPS, attack.steps), restarts=1)


def never_worse(p: Prepared, config: MaskConfig, base: Baseline, strength: Strength, what: str) -> Strength:
    """Keep the chosen candidate only if its worst case per sample over the selection attack and
    APGD-CE (both adaptive) on validation beats the original's; else drop it, saying why."""
    if strength.chosen is None:
        return strength
    cfg, bs, y = guard_attack(p.attack), config.ort_batch_size, p.val.y
    batch = p.attack_batch.size

    def worst(runner: Runner, selection: np.ndarray) -> float:
        """APGD-CE only on the samples the selection attack left correct (evaluate --cumulative's way):
        the same worst case per sample, each sample's randomness being its own, in less time."""
        still = np.flatnonzero(selection)
        if not len(still):
            return 0.0
        apgd = p.backend.survivors(runner, runner, cfg, p.val.subset(still), p.device, batch, bs,
                                   f" validation APGD-CE-{cfg.steps}")
        return float(apgd.sum() / len(selection))

    if base.guard is None:  # harden's default judges two candidates against the same original
        base.guard = worst(p.runner, p.runner.predict(base.adv, bs) == y)
    original = base.guard
    hardened = worst(strength.runner, strength.survived)
    strength.guard = {"attack": f"{cfg.name}-{cfg.steps} and {p.attack.name}-{p.attack.steps}, adaptive, worst case",
                      "original": original, "hardened": hardened}
    log.info("the %s at strength %g against APGD-CE-%d and %s-%d on validation, worst case: %.1f%% (the "
             "original: %.1f%%)", what, strength.chosen.alpha, cfg.steps, p.attack.name, p.attack.steps,
             100 * hardened, 100 * original)
    if hardened <= original:
        log.warning("the %s at strength %g is not more robust than the original against APGD-CE-%d on validation "
                    "(%.1f%% vs %.1f%%, worst case): nothing is changed", what, strength.chosen.alpha, cfg.steps,
                    100 * hardened, 100 * original)
        strength.chosen, strength.runner, strength.survived = None, None, None
    return strength


def judge_adaptively(p: Prepared, config: MaskConfig, base: Baseline, runner: Runner, what: str) -> Strength:
    """A change chosen some other way (a learned mask on one tensor, cut by transfer accuracy through
    the numpy head), judged as a chosen strength is: the run's attack crafted on it, then
    :func:`never_worse`. ``chosen`` is None when it does not beat the original."""
    bs = config.ort_batch_size
    adv = p.adversarial(runner, p.val, f" validation ({what}, adaptive)")
    survived = runner.predict(adv, bs) == p.val.y
    point = StrengthPoint(1.0, runner.accuracy(p.val, bs), float(survived.mean()), 0.0)
    return never_worse(p, config, base, Strength(point, [], 0.0, runner, survived), what)

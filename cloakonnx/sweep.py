"""``cloakonnx sweep``: the whole trade-off curve for every score, from one attack of each split; with
``--method finetune``, the curve of fine-tuned weights against their strength (alpha)."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .config import ALL_SCORES, FINETUNE, LEARNED, MaskConfig
from .curve import choose_point, counts_for, mask_curve
from .data import Dataset
from .errors import CloakError
from .learn import learn_on
from .mask import SCORES, ranking, score_features
from .pipeline import prepare
from .runner import collect_features
from .timing import StageTimer


@dataclass
class SweepReport:
    model: str
    feature_tensor: str
    features: int
    attack: dict
    samples: dict
    clean_accuracy: float  # original model, validation split
    adversarial_accuracy: float  # original model, validation split
    max_clean_drop: float
    budget_confidence: float
    curves: dict  # score -> [CurvePoint dict]
    chosen: dict  # score -> CurvePoint dict or None
    best: dict  # {"score", "point"} or {"score": None}
    scores: dict  # score -> per-feature values (for the distribution plot)
    seconds: float
    # --method finetune: {"method", "curve" (per alpha: clean, adaptive, bound, margin), "chosen", "guard", ...}
    strength: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(model_path: str | Path, data: str | Path | Dataset, config: MaskConfig,
          scores: Sequence[str] = tuple(SCORES)) -> SweepReport:
    """The whole curve for every score, from one attack of each split: no model is written."""
    t0 = time.perf_counter()
    unknown = [s for s in scores if s not in ALL_SCORES]
    if unknown:
        raise CloakError(f"unknown score {unknown[0]!r}; choose from {', '.join(ALL_SCORES)}")
    p = prepare(model_path, data, config)
    try:
        if config.method == FINETUNE:
            return _sweep_finetune(p, model_path, config, t0)
        return _sweep(p, model_path, config, scores, t0)
    finally:
        p.close()


def _sweep(p, model_path, config: MaskConfig, scores: Sequence[str], t0: float) -> SweepReport:
    if p.target.head is None:
        raise CloakError("sweep evaluates masks through the linear head in numpy; it needs the head's input as "
                         "the feature tensor (not a custom --feature-tensor)")
    runner, val, head, bs = p.runner, p.val, p.target.head, config.ort_batch_size
    stats, _, _ = p.calibrate(runner, bs, StageTimer())
    adv_val = p.adversarial(runner, val, " validation")
    clean, adv = runner.accuracy(val, bs), runner.accuracy(val, bs, adv_val)
    f_clean = collect_features(runner.session, p.target.feature, val.x, runner.feed, bs)
    f_adv = collect_features(runner.session, p.target.feature, adv_val, runner.feed, bs)
    existing = p.target.existing_mask
    already = 0 if existing is None else int((existing == 0).sum())
    budget = 1.0 if config.max_clean_drop is None else config.max_clean_drop
    curves, chosen, values = {}, {}, {}
    for score in scores:
        scale = None
        if score == LEARNED:
            learned = learn_on(p, config, p.model, [p.target.feature]).values[p.target.feature]
            s, scale = 1.0 - learned, learned if config.mask_values == "soft" else None
        else:
            s = score_features(stats, score)
        values[score] = s.tolist()
        points = mask_curve(head, ranking(s, existing), counts_for(config.fractions, stats.width, already),
                            f_clean, f_adv, val.y, existing, config.budget_confidence or 0.9, scale)
        curves[score] = [pt.to_dict() for pt in points]
        best = choose_point(points, clean, budget, use_bound=bool(config.budget_confidence))
        chosen[score] = best.to_dict() if best else None
    winners = [(c["adversarial_accuracy"], -c["added"], sc) for sc, c in chosen.items() if c]
    best = {"score": max(winners)[2], "point": chosen[max(winners)[2]]} if winners else {"score": None, "point": None}
    return SweepReport(
        model=str(model_path), feature_tensor=p.target.feature, features=stats.width,
        attack=dict(p.attack.to_dict(), fallback=p.fallback),
        samples={"calibration": len(p.calib), "validation": len(val)}, clean_accuracy=clean, adversarial_accuracy=adv,
        max_clean_drop=budget, budget_confidence=config.budget_confidence, curves=curves, chosen=chosen, best=best, scores=values,
        seconds=round(time.perf_counter() - t0, 3),
    )


def _sweep_finetune(p, model_path, config: MaskConfig, t0: float) -> SweepReport:
    """Fine-tune the weights and measure every strength on validation, as harden would choose from:
    clean and adaptive accuracy per alpha, the clean-drop bound, and the chosen point; nothing is written."""
    from .finetune import search_weights
    from .harden import evaluate_original

    base = evaluate_original(p, config)
    search = search_weights(p, config, base, StageTimer())
    learning = search.learning
    return SweepReport(
        model=str(model_path), feature_tensor=p.target.feature, features=0,
        attack=dict(p.attack.to_dict(), fallback=p.fallback),
        samples={"calibration": len(p.calib), "validation": len(p.val)}, clean_accuracy=base.clean,
        adversarial_accuracy=base.adv_accuracy, max_clean_drop=learning["max_clean_drop"],
        budget_confidence=config.budget_confidence, curves={}, chosen={}, best={"score": None, "point": None},
        scores={}, seconds=round(time.perf_counter() - t0, 3),
        strength={"method": FINETUNE, "params": learning["params"], "curve": search.curve,
                  "chosen": learning["alpha"], "guard": learning["guard"], "learning_seconds": learning["seconds"]},
    )

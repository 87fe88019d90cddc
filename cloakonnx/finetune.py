"""Fine-tuned weights (``harden --method finetune``): adversarial training of a deployed model's
initializers, without its training code, then a step back towards the original chosen on validation.

A peer of :mod:`cloakonnx.learn`: the chosen float initializers (:func:`cloakonnx.graph.trainable_initializers`)
become graph inputs (:func:`cloakonnx.graph.with_weight_inputs`) so the torch executor passes
gradients to them. Each step crafts a short attack (PGD with the run's eps and norm, random start;
or FGSM with a random start) against the *current* weights (the adaptive attacker) on a batch of
calibration samples, then Adam moves the weights alone with the loss CE(x_adv) + CE(x). Nothing in
the loss rewards smaller logits.

The weights written are w0 + alpha (w - w0), alpha chosen on the validation split against the
adaptive attacker within the clean budget, and kept only if it beats the original under APGD-CE
as well (:mod:`cloakonnx.strength`); otherwise the model is written unchanged.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx

from .attacks import AttackConfig
from .config import FINETUNE, LR_BACKOFF, LR_BACKOFFS, HardenConfig, LearnConfig
from .data import Dataset, Preprocess
from .errors import CloakError
from .graph import (CloakRecord, initializer_values, relative_change, select_input, trainable_initializers,
                    with_weight_inputs, with_weights)
from .graph.record import set_metadata
from .learn import StepTooLarge, adversarial_training
from .pipeline import Prepared
from .search import Baseline, MaskSearch
from .strength import choose_strength, never_worse
from .timing import StageTimer

log = logging.getLogger(__name__)



@dataclass
class FinetunedWeights:
    """The original (``start``) and trained (``values``) weights by initializer name, and the cost."""

    start: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    seconds: float
    steps: int
    lr: float
    history: list[float] = field(default_factory=list)  # the training loss every 10 steps
    rose: list[float] = field(default_factory=list)  # the step sizes given up on: the loss rose at each
    stopped_by: str | None = None  # what ended it early: "loss", "validation" (learn.Training); None: every step


@dataclass
class WeightSearch(MaskSearch):
    """Where a fine-tuning ended, in the shape harden's report reads: no mask added; ``model`` is the
    model to write (fine-tuned and recorded) when ``weights_changed``."""

    weights_changed: bool = False
    model: onnx.ModelProto | None = None

    @property
    def changed(self) -> bool:
        return self.weights_changed


def interpolate(w0: dict[str, np.ndarray], w: dict[str, np.ndarray], alpha: float) -> dict[str, np.ndarray]:
    """w0 + alpha (w - w0) per tensor, in w0's dtype; alpha = 0 gives w0's bytes exactly."""
    if alpha == 0:
        return {n: v.copy() for n, v in w0.items()}
    return {n: (v.astype(np.float64) + alpha * (w[n].astype(np.float64) - v)).astype(v.dtype) for n, v in w0.items()}


def finetune_weights(model: onnx.ModelProto, names: list[str], logits: str, preprocess: Preprocess, data: Dataset,
                     attack: AttackConfig, config: LearnConfig, device: str = "cpu", seed: int = 0,
                     input_name: str | None = None, watch: Dataset | None = None) -> FinetunedWeights:
    """Train the initializers ``names`` against an adaptive attacker on ``data`` (the calibration split);
    ``watch``: held-out samples for the early stop (the validation split)."""
    import torch

    from .torch_exec import OnnxTorchModule

    config.validate()
    config = config.with_defaults_for(FINETUNE)
    start, lr = time.perf_counter(), config.lr_for(FINETUNE)
    image = select_input(model, input_name).name
    w0 = initializer_values(model, names)
    module = OnnxTorchModule(with_weight_inputs(model, names), outputs=[logits]).to(device).eval()
    if sorted(module.input_names) != sorted([image, *names]):
        raise CloakError(f"fine-tuning needs a model with one input, this one takes {module.input_names}")
    backoffs = 0 if config.lr is not None else LR_BACKOFFS  # a step size the user chose is kept
    rose = []
    while True:
        torch.manual_seed(seed)  # each try starts as a run with --learn-lr at its step size would
        weighted = weighted_model(module, image, w0).to(device)
        net = preprocess.torch_wrap(weighted, data.x.ndim)  # box-space inputs, as the attacks expect
        try:
            run = adversarial_training(net, weighted.weights.parameters(), data, attack, config, lr,
                                       preprocess.bounds, device, seed, "fine-tuning the weights",
                                       stop_below=config.stop_loss or None, check_rise=len(rose) < backoffs,
                                       watch=watch)
            break
        except StepTooLarge as e:
            rose.append(lr)
            log.warning("fine-tuning at step size %g: %s; starting again from the original weights at %g",
                        lr, e, lr / LR_BACKOFF)
            lr /= LR_BACKOFF
    values = {n: p.detach().cpu().numpy().astype(w0[n].dtype) for n, p in zip(names, weighted.parameter_list())}
    seconds = time.perf_counter() - start
    log.info("fine-tuned %d weight tensors in %.1f s (%d steps, lr %g)", len(names), seconds, run.steps, lr)
    return FinetunedWeights(w0, values, seconds, run.steps, lr, run.history, rose, run.stopped_by)


def _weighted_model_class():
    import torch

    class WeightedModel(torch.nn.Module):
        """Model input -> logits of the graph, its weights fed from trainable parameters."""

        def __init__(self, module, image: str, w0: dict[str, np.ndarray]):
            super().__init__()
            self.module, self.image, self.names = module, image, list(w0)
            self.weights = torch.nn.ParameterDict(
                {str(i): torch.nn.Parameter(torch.from_numpy(np.array(v, np.float32))) for i, v in
                 enumerate(w0.values())})

        def parameter_list(self):
            return [self.weights[str(i)] for i in range(len(self.names))]

        def forward(self, x):
            feeds = {self.image: x, **dict(zip(self.names, self.parameter_list()))}
            return self.module(*[feeds[n] for n in self.module.input_names])

    return WeightedModel


def weighted_model(module, image: str, w0: dict[str, np.ndarray]):
    """A ``WeightedModel`` over ``module`` (the class is built on first use, so torch loads lazily)."""
    return _weighted_model_class()(module, image, w0)


def search_weights(p: Prepared, config: HardenConfig, base: Baseline, timer: StageTimer) -> WeightSearch:
    """Fine-tune the weights ``config.finetune_params`` selects on the calibration split, choose alpha
    on validation, and hold the model to write (the original when no alpha beats it adaptively)."""
    names = trainable_initializers(p.model, config.finetune_params)
    existing = p.target.existing_mask
    previously = 0 if existing is None else int((existing == 0).sum())
    search = WeightSearch(p.target.feature, p.runner, {}, {}, previously,
                          widths={} if existing is None else {p.target.feature: int(existing.size)})
    with timer("learning"):
        result = finetune_weights(p.model, names, p.target.logits, config.preprocess, p.calib, p.attack, config.learn,
                                  p.device, config.seed, config.input_name, watch=p.val)
    with timer("selection"):
        strength = choose_strength(p, config, base, lambda alpha: with_weights(
            p.model, interpolate(result.start, result.values, alpha)), "fine-tuned weights")
        strength = never_worse(p, config, base, strength, "fine-tuned weights")
    best, points, budget = strength.chosen, strength.points, strength.budget
    search.curve = [pt.to_dict() for pt in points]
    search.learning = {"method": FINETUNE, "params": config.finetune_params, "tensors": len(names),
                       "seconds": round(result.seconds, 3), "steps": result.steps, "stopped_by": result.stopped_by,
                       "lr": result.lr,
                       "lr_given_up": result.rose, "loss": result.history, "max_clean_drop": budget, "alpha": None if best is None else best.alpha,
                       "guard": strength.guard, "bound_note": strength.bound_note,
                       "median_margin": {"original": points[0].median_margin, "trained": points[-1].median_margin,
                                         "written": (points[0] if best is None else best).median_margin}}
    if best is None:
        return search
    with timer("surgery"):
        values = interpolate(result.start, result.values, best.alpha)
        change = {n: float(f"{v:.6g}") for n, v in relative_change(result.start, values).items()}
        search.model = with_weights(p.model, values)
        set_metadata(search.model, finetune_record(p, config, result, best.alpha, budget, change).metadata(p.model))
    search.runner, search.weights_changed = strength.runner, True
    search.learning["relative_change"] = change
    return search


def finetune_record(p: Prepared, config: HardenConfig, result: FinetunedWeights, alpha: float, budget: float,
                    change: dict[str, float]) -> CloakRecord:
    """The cloak record of a fine-tuning: method, the weights moved and by how much, alpha and where it
    was chosen; the mask fields describe the input's mask, if it had one (fine-tuning keeps it)."""
    existing = p.target.existing_mask
    return CloakRecord(
        feature_tensor=p.target.feature, features=0 if existing is None else int(existing.size),
        masked=0 if existing is None else int((existing == 0).sum()), score="none", attack=p.attack.to_dict(),
        seed=config.seed, rounds=1, max_clean_drop=budget, budget_confidence=config.budget_confidence,
        method=FINETUNE, finetune={"params": config.finetune_params, "alpha": alpha, "validation_samples": len(p.val),
                                   "clean_budget": budget,
                                   "relative_change": change, "lr": result.lr, "steps": result.steps,
                                   "inner_attack": config.learn.with_defaults_for(FINETUNE).inner_attack})

"""Masks on several layers at once: learned jointly, one per tensor, chosen through onnxruntime.

``--feature-tensor`` given several times, or ``auto``, masks the head's input and feature maps
inside the network (one value per channel). The masks are learned together against an adaptive
attacker (:mod:`cloakonnx.learn`); each tensor's learned values are then cut at a common threshold.
Without a budget the threshold is 0.5; with ``max_clean_drop`` each candidate threshold is written
into the graph and measured on the validation split through onnxruntime, since the numpy head alone
cannot see masks inside the network.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from .config import HardenConfig
from .curve import CutPoint, choose_point, clean_drop_bound
from .errors import CloakError
from .graph import apply_mask, find_mask
from .pipeline import Prepared
from .runner import predict
from .search import Baseline, MaskSearch
from .timing import StageTimer
from .runtime import make_session

log = logging.getLogger(__name__)

THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)  # candidates under a clean-accuracy budget
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSwish", "HardSigmoid", "Sigmoid",
               "Tanh", "Gelu", "Softplus", "Mish", "ThresholdedRelu", "Mul"}


def candidate_tensors(model: onnx.ModelProto, head_feature: str | None, shapes: dict[str, tuple]) -> list[str]:
    """``auto``: the head's input, and the last activation output of each resolution stage.

    ``shapes`` maps activation outputs to their shapes from one forward pass; a stage is a run of
    4-D activations with the same height and width, in graph order."""
    last: dict[tuple, str] = {}
    for node in model.graph.node:
        for out in node.output:
            shape = shapes.get(out)
            if shape is not None and len(shape) == 4:
                last[tuple(shape[2:])] = out
    picked = [t for t in last.values() if t != head_feature]
    return ([head_feature] if head_feature else []) + picked


def activation_outputs(model: onnx.ModelProto) -> list[str]:
    """Outputs of activation-like nodes (SiLU's Mul included), in graph order: the ``auto`` candidates."""
    return [n.output[0] for n in model.graph.node if n.op_type in ACTIVATIONS and n.output]


def resolve_tensors(p: Prepared, config: HardenConfig) -> list[str]:
    from .learn import tensor_shapes

    if config.feature_tensors != ("auto",):
        return list(config.feature_tensors)
    outputs = activation_outputs(p.model)
    shapes = tensor_shapes(p.model, outputs, config.preprocess, p.calib.x[:1], p.runner.input.name)
    head = p.target.head.feature if p.target.head is not None else None
    tensors = candidate_tensors(p.model, head, shapes)
    if len(tensors) < 2:
        raise CloakError("--feature-tensor auto found no feature maps to mask besides the head's input; "
                         "name the tensors with --feature-tensor NAME (several times)")
    log.info("--feature-tensor auto: %s", ", ".join(tensors))
    return tensors


def search_layers(p: Prepared, config: HardenConfig, base: Baseline, timer: StageTimer) -> MaskSearch:
    """Learn masks on several tensors jointly and cut them at the threshold the budget allows."""
    from .learn import learn_stage

    if config.fraction is not None:
        raise CloakError("--fraction applies to one feature tensor; with several, the learned values decide "
                         "(cut at 0.5), or --max-clean-drop chooses the cut")
    tensors = resolve_tensors(p, config)
    existing = {t: _existing(p, t) for t in tensors}
    previously = sum(int((m == 0).sum()) for m in existing.values() if m is not None)
    search = MaskSearch(tensors[0], p.runner, dict(existing), {}, previously)
    _, calib_clean, calib_adv = p.calibrate(p.runner, config.ort_batch_size, timer)
    search.calibration = {"clean_accuracy": calib_clean, "adversarial_accuracy": calib_adv}
    learned = learn_stage(p, config, search, timer, tensors)
    search.widths = {t: v.size for t, v in learned.items()}
    search.scores = np.concatenate([1.0 - learned[t] for t in tensors])
    with timer("selection"):
        threshold, search.curve = choose_threshold(p, config, base, search, learned, existing)
    if threshold is None:
        log.info("no cut of the learned masks improves adversarial accuracy within the clean-accuracy budget")
        search.rounds.append({"round": 1, "added": 0, "masked": previously})
        return search
    with timer("surgery"):
        search.masks = cut(learned, existing, threshold, config.mask_values == "soft")
        model = with_masks(p.model, search.masks, search.ranks)
    search.runner = p.runner_for(model, config)
    search.rounds.append({"round": 1, "added": search.masked - previously, "masked": search.masked,
                          "threshold": threshold})
    return search


def _existing(p: Prepared, tensor: str) -> np.ndarray | None:
    """The cloak mask the input model already has on ``tensor`` (Mul, or folded into the head)."""
    if p.target.head is not None and tensor == p.target.head.feature:
        return p.target.existing_mask
    found = find_mask(p.model, tensor)
    return None if found is None else found[1]


def cut(learned: dict[str, np.ndarray], existing: dict, threshold: float, soft: bool) -> dict[str, np.ndarray]:
    """Per tensor: zero the values below ``threshold``, keep the rest (soft: scaled by the learned
    value), on top of any earlier mask (the union of zeros)."""
    masks = {}
    for tensor, values in learned.items():
        new = np.where(values < threshold, 0.0, values if soft else 1.0)
        earlier = existing.get(tensor)
        masks[tensor] = (new * (1.0 if earlier is None else earlier)).astype(np.float32)
    return masks


def with_masks(model: onnx.ModelProto, masks: dict[str, np.ndarray], ranks: dict[str, int]) -> onnx.ModelProto:
    for tensor, mask in masks.items():
        model = apply_mask(model, tensor, mask, ranks.get(tensor, 2))
    return model


def choose_threshold(p: Prepared, config: HardenConfig, base: Baseline, search: MaskSearch, learned: dict,
                     existing: dict) -> tuple[float | None, list[dict] | None]:
    """0.5 without a budget; with one, the candidate cut with the best adversarial accuracy (inputs
    crafted on the original) on validation whose clean drop is within the budget, measured through
    onnxruntime; None when no cut beats adding nothing."""
    if config.max_clean_drop is None:
        return 0.5, None
    soft, y, bs = config.mask_values == "soft", p.val.y, config.ort_batch_size
    before = p.runner.predict(p.val.x, bs) == y
    points = []
    for threshold in THRESHOLDS:
        masks = cut(learned, existing, threshold, soft)
        session = make_session(with_masks(p.model, masks, search.ranks), config.providers)
        correct = predict(session, p.val.x, p.runner.feed, p.target.logits, bs) == y
        adv = float((predict(session, base.adv, p.runner.feed, p.target.logits, bs) == y).mean())
        points.append(CutPoint(threshold, int(sum((m == 0).sum() for m in masks.values())), float(correct.mean()),
                               adv, clean_drop_bound(before, correct, config.budget_confidence or 0.9)))
    best = choose_point(points, base.clean, config.max_clean_drop, use_bound=bool(config.budget_confidence),
                        floor=base.adv_accuracy)
    return (None if best is None else best.threshold), [pt.to_dict() for pt in points]

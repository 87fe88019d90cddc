"""Masks on several layers at once: learned jointly, one per tensor, chosen through onnxruntime.

``--feature-tensor`` given several times, or ``auto``, masks the head's input and feature maps
inside the network (one value per channel). The masks are learned together against an adaptive
attacker (:mod:`cloakonnx.learn`); each tensor's learned values below 0.5 are zeroed (binary: the
rest kept at 1). How strongly the result is applied, m_a = 1 - a (1 - m), is then chosen on the
validation split against the adaptive attacker, within the clean budget (:mod:`cloakonnx.strength`),
through onnxruntime, since the numpy head alone cannot see masks inside the network; a mask that
does not beat the original there is not written.
"""
from __future__ import annotations

import logging

import numpy as np
import onnx

from .config import HardenConfig
from .errors import CloakError
from .graph import apply_mask, find_mask
from .pipeline import Prepared
from .search import Baseline, MaskSearch
from .strength import choose_strength, never_worse
from .timing import StageTimer

log = logging.getLogger(__name__)

CUT = 0.5  # learned values below it are zeroed
ACTIVATIONS = {"Relu", "Clip", "LeakyRelu", "PRelu", "Elu", "Selu", "Celu", "HardSwish", "HardSigmoid", "Sigmoid",
               "Tanh", "Gelu", "Softplus", "Mish", "ThresholdedRelu", "Mul"}


def candidate_tensors(model: onnx.ModelProto, head_feature: str | None, shapes: dict[str, tuple]) -> list[str]:
    """``auto``: the head's input, and the last activation output of each resolution stage.

    ``shapes`` maps activation outputs to their shapes from one forward pass; a stage is a run of
    4-D activations with the same height and width, in graph order. With a head, a 1x1 map is
    skipped: after global pooling it holds the head's input features again (masking both would
    mask them twice)."""
    last: dict[tuple, str] = {}
    for node in model.graph.node:
        for out in node.output:
            shape = shapes.get(out)
            if shape is not None and len(shape) == 4 and not (head_feature and tuple(shape[2:]) == (1, 1)):
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
    if not tensors:
        raise CloakError("--feature-tensor auto found neither a linear head's input nor a feature map to mask; "
                         "name the tensors with --feature-tensor NAME (several times)")
    if len(tensors) == 1:
        log.info("--feature-tensor auto: the model has no feature maps, only the head's input")
    log.info("--feature-tensor auto: %s", ", ".join(tensors))
    return tensors


def search_layers(p: Prepared, config: HardenConfig, base: Baseline, timer: StageTimer) -> MaskSearch:
    """Learn masks on several tensors jointly and cut them at the threshold the budget allows."""
    from .learn import learn_stage

    tensors = resolve_tensors(p, config)
    existing = {t: _existing(p, t) for t in tensors}
    previously = sum(int((m == 0).sum()) for m in existing.values() if m is not None)
    search = MaskSearch(tensors[0], p.runner, dict(existing), {}, previously)
    _, calib_clean, calib_adv = p.calibrate(p.runner, config.ort_batch_size, timer)
    search.calibration = {"clean_accuracy": calib_clean, "adversarial_accuracy": calib_adv}
    learned = learn_stage(p, config, search, timer, tensors)
    search.widths = {t: v.size for t, v in learned.items()}
    search.scores = np.concatenate([1.0 - learned[t] for t in tensors])
    soft = config.mask_values == "soft"
    with timer("selection"):
        strength = choose_strength(p, config, base, lambda alpha: with_masks(
            p.model, cut(learned, existing, CUT, soft, alpha), search.ranks), "learned masks")
        strength = never_worse(p, config, base, strength, "learned masks")
    search.curve = [pt.to_dict() for pt in strength.points]
    search.learning.update(max_clean_drop=strength.budget, guard=strength.guard, bound_note=strength.bound_note,
                           strength=None if strength.chosen is None else strength.chosen.alpha)
    if strength.chosen is None:
        search.rounds.append({"round": 1, "added": 0, "masked": previously})
        return search
    search.masks = cut(learned, existing, CUT, soft, strength.chosen.alpha)
    search.runner = strength.runner
    search.rounds.append({"round": 1, "added": search.masked - previously, "masked": search.masked,
                          "threshold": CUT, "strength": strength.chosen.alpha})
    return search


def _existing(p: Prepared, tensor: str) -> np.ndarray | None:
    """The cloak mask the input model already has on ``tensor`` (Mul, or folded into the head)."""
    if p.target.head is not None and tensor == p.target.head.feature:
        return p.target.existing_mask
    found = find_mask(p.model, tensor)
    return None if found is None else found[1]


def cut(learned: dict[str, np.ndarray], existing: dict, threshold: float, soft: bool,
        strength: float = 1.0) -> dict[str, np.ndarray]:
    """Per tensor: zero the values below ``threshold``, keep the rest (soft: scaled by the learned
    value), applied at ``strength`` (m -> 1 - strength (1 - m)), on top of any earlier mask (the
    union of zeros)."""
    masks = {}
    for tensor, values in learned.items():
        new = np.where(values < threshold, 0.0, values if soft else 1.0)
        if strength != 1.0:
            new = 1.0 - strength * (1.0 - new)
        earlier = existing.get(tensor)
        masks[tensor] = (new * (1.0 if earlier is None else earlier)).astype(np.float32)
    return masks


def with_masks(model: onnx.ModelProto, masks: dict[str, np.ndarray], ranks: dict[str, int]) -> onnx.ModelProto:
    for tensor, mask in masks.items():
        model = apply_mask(model, tensor, mask, ranks.get(tensor, 2))
    return model

"""The cloak record: how a hardened model says what was done to it.

Everything that names or reads cloakonnx's traces in a graph lives here: the mask node's name
prefix, the ``cloakonnx.*`` metadata keys, the history of hardenings, and the mask itself in either
form (a ``Mul`` node before the head, or folded into the head's weights and recorded in metadata).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx

from .. import __version__
from ..errors import CloakError
from .tensors import const_array, constants

MASK_NODE_PREFIX = "cloakonnx_mask"
METADATA_PREFIX = "cloakonnx."
FORM_KEY = METADATA_PREFIX + "form"
FOLDED_MASK_KEY = METADATA_PREFIX + "folded_mask"
HISTORY_KEY = METADATA_PREFIX + "history"
FOLDED = "folded"
MUL = "mul"


def check_mask_values(mask: np.ndarray) -> np.ndarray:
    """A mask as a flat float64 vector, refused unless every value is in [0, 1]: 0 masks a feature,
    1 keeps it, and values between scale it (a soft mask)."""
    values = np.asarray(mask, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(values)) or np.any(values < 0) or np.any(values > 1):
        raise CloakError("a cloak mask must hold values in [0, 1] (0 masks a feature, 1 keeps it, "
                         "values between scale it)")
    return values


def is_soft(mask: np.ndarray) -> bool:
    """Whether a mask scales some features instead of only keeping or zeroing them."""
    return bool(np.any((mask > 0) & (mask < 1)))


def is_mask_node(node: onnx.NodeProto) -> bool:
    return node.op_type == "Mul" and node.name.startswith(MASK_NODE_PREFIX)


@dataclass
class CloakRecord:
    """One hardening, as written into the model: flat ``cloakonnx.*`` keys describe the current
    mask, and ``cloakonnx.history`` appends this record to the earlier ones."""

    feature_tensor: str
    features: int
    masked: int
    score: str
    attack: dict
    seed: int
    rounds: int
    max_clean_drop: float | None
    budget_confidence: float | None
    form: str = MUL  # MUL or FOLDED
    mask_values: str | None = None  # "soft" when some values scale rather than zero
    masks: list[dict] | None = None  # with several masked tensors: one entry each
    method: str | None = None  # "finetune" when the weights were fine-tuned (None: a mask, the default)
    finetune: dict | None = None  # with method "finetune": params, tensors' relative change, alpha, validation size

    def metadata(self, model: onnx.ModelProto) -> dict[str, str]:
        """The metadata entries to set on the hardened copy of ``model``."""
        fraction = self.masked / self.features if self.features else 0.0
        entry = {"version": __version__, "masked": self.masked, "fraction": fraction, "score": self.score,
                 "feature_tensor": self.feature_tensor, "attack": self.attack, "seed": self.seed,
                 "rounds": self.rounds, "max_clean_drop": self.max_clean_drop,
                 "budget_confidence": self.budget_confidence, "form": self.form}
        extra = {k: v for k, v in (("mask_values", self.mask_values), ("masks", self.masks), ("method", self.method),
                                   ("finetune", self.finetune)) if v is not None}
        entry.update(extra)
        return {
            METADATA_PREFIX + "version": __version__,
            METADATA_PREFIX + "feature_tensor": self.feature_tensor,
            METADATA_PREFIX + "features": str(self.features),
            METADATA_PREFIX + "masked": str(self.masked),
            METADATA_PREFIX + "fraction": repr(fraction),
            METADATA_PREFIX + "score": self.score,
            METADATA_PREFIX + "attack": json.dumps(self.attack, sort_keys=True),
            FORM_KEY: self.form,
            HISTORY_KEY: history_entry(model, entry),
            **{METADATA_PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True) for k, v in extra.items()},
        }


def set_metadata(model: onnx.ModelProto, values: dict[str, str]) -> None:
    """Add or replace metadata_props, keeping every other entry and the order of existing keys."""
    props = {p.key: p for p in model.metadata_props}
    for key, value in values.items():
        if key in props:
            props[key].value = str(value)
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, str(value)


def cloak_metadata(model: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in model.metadata_props if p.key.startswith(METADATA_PREFIX)}


def history_entry(model: onnx.ModelProto, record: dict) -> str:
    """JSON history of every hardening applied to this model, newest last."""
    old = cloak_metadata(model).get(HISTORY_KEY)
    history = json.loads(old) if old else []
    history.append(record)
    return json.dumps(history, sort_keys=True)


def find_mask(model: onnx.ModelProto, feature: str) -> tuple[str, np.ndarray] | None:
    """The cloak Mul mask (node name, flattened values) already applied to ``feature``, if any."""
    consts = constants(model)
    for node in model.graph.node:
        if is_mask_node(node) and feature in node.input:
            other = node.input[1] if node.input[0] == feature else node.input[0]
            m = const_array(consts, other)
            if m is not None:
                return node.name, m.reshape(-1).astype(np.float32)
    return None


def all_masks(model: onnx.ModelProto) -> list[dict]:
    """Every cloak mask in the graph: one entry per Mul node (the tensor it masks, how many values it
    zeroes and scales), and the folded one if the metadata records it."""
    consts = constants(model)
    found = []
    for node in model.graph.node:
        if not is_mask_node(node):
            continue
        for i, j in ((0, 1), (1, 0)):
            values = const_array(consts, node.input[j])
            if values is not None:
                found.append(_describe(values.reshape(-1), "mul", node.input[i], node.name))
                break
    folded = folded_mask(model)
    if folded is not None:
        found.append(_describe(folded, FOLDED, None, None))
    return found


def _describe(values: np.ndarray, form: str, tensor: str | None, node: str | None) -> dict:
    return {"form": form, "tensor": tensor, "node": node, "width": int(values.size),
            "zeroed": int((values == 0).sum()), "scaled": int(((values > 0) & (values < 1)).sum())}


def folded_mask(model: onnx.ModelProto) -> np.ndarray | None:
    """The 0/1 mask (float32, one entry per feature) folded into this model's head, or None."""
    record = next((p.value for p in model.metadata_props if p.key == FOLDED_MASK_KEY), None)
    if record is None:
        return None
    try:
        data = json.loads(record)
        width = int(data["features"])
        zero = np.asarray(data["zero"], dtype=np.int64).reshape(-1)
        if width < 0 or (zero.size and (zero.min() < 0 or zero.max() >= width)):
            raise ValueError("index out of range")
    except (ValueError, KeyError, TypeError) as exc:
        raise CloakError(f"the model's {FOLDED_MASK_KEY} metadata is not a valid folded-mask record: {exc}") from exc
    mask = np.ones(width, np.float32)
    mask[zero] = 0
    for index, value in data.get("scale", []):
        mask[int(index)] = value
    return mask


def encode_folded(values: np.ndarray) -> str:
    """``{"features": F, "zero": [indices of masked features]}``: small for the usual 1-10% masks.
    A soft mask adds ``"scale": [[index, value], ...]`` for the features it scales."""
    record = {"features": int(values.size), "zero": np.flatnonzero(values == 0).tolist()}
    soft = np.flatnonzero((values > 0) & (values < 1))
    if soft.size:
        record["scale"] = [[int(i), float(values[i])] for i in soft]
    return json.dumps(record, separators=(",", ":"))

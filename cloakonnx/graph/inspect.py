"""``cloakonnx inspect``: what a user needs to know before hardening, read from the graph alone."""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..errors import CloakError
from .head import Head, find_head
from .io import load_model
from .record import METADATA_PREFIX, all_masks, cloak_metadata, folded_mask
from .tensors import TensorInfo, fixed_size, model_inputs, opset_version, tensor_infos


@dataclass
class ModelInfo:
    path: str
    ir_version: int
    opset: int
    producer: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    dynamic_batch: bool
    nodes: int
    head: dict | None
    head_error: str | None
    metadata: dict[str, str]
    masks: list[dict]  # every cloak mask: Mul nodes on any tensor, and a mask folded into the head
    input_shapes: dict[str, list[int]]  # the shapes --input-shapes gave, checked against the model; {} if none
    method: str | None = None  # how cloakonnx last hardened it: "mask" or "finetune"; None if it never did
    finetune: dict | None = None  # with "finetune": the params moved, their relative change, alpha, validation size

    def to_dict(self) -> dict:
        return asdict(self)


def describe_head(head: Head) -> dict:
    masked = None if head.mask is None else int((head.mask == 0).sum())
    return {
        "kind": head.kind,
        "nodes": head.nodes,
        "feature_tensor": head.feature,
        "features": head.width,
        "classes": int(head.weight.shape[1]),
        "logits": head.logits,
        "mask": None if head.mask is None else {"form": "mul", "node": head.mask_node, "masked": masked,
                                                "fraction": masked / head.width},
    }


def inspect_model(path: str | os.PathLike, logits: str | None = None,
                  input_shapes: dict | None = None) -> ModelInfo:
    """Everything a user needs to know before hardening: signature, opset, head, feature tensor, mask;
    and the ``input_shapes`` the model would run with, checked, so that a wrong one fails here."""
    model = load_model(path)
    inputs = model_inputs(model)
    input_shapes = input_shapes or {}
    given = {i.name: i.shape for i in model_inputs(model, input_shapes) if i.name in input_shapes}
    head, err = None, None
    try:
        found = find_head(model, logits)
        head = describe_head(found)
        if found.mask is None:
            folded = folded_mask(model)
            if folded is not None:
                masked = int((folded == 0).sum())
                head["mask"] = {"form": "folded", "node": None, "masked": masked, "fraction": masked / found.width}
    except CloakError as exc:
        err = str(exc)
    dyn = bool(inputs) and bool(inputs[0].shape) and fixed_size(inputs[0].shape[0]) is None
    return ModelInfo(
        path=str(path),
        ir_version=model.ir_version,
        opset=opset_version(model),
        producer=" ".join(x for x in (model.producer_name, model.producer_version) if x),
        inputs=inputs,
        outputs=tensor_infos(model.graph.output),
        dynamic_batch=dyn,
        nodes=len(model.graph.node),
        head=head,
        head_error=err,
        metadata={p.key: p.value for p in model.metadata_props},
        masks=all_masks(model),
        input_shapes=given,
        **hardening(model),
    )


def hardening(model) -> dict:
    """The method of the last hardening recorded in the metadata, and a fine-tuning's record."""
    meta = cloak_metadata(model)
    if not meta:
        return {"method": None, "finetune": None}
    record = meta.get(METADATA_PREFIX + "finetune")
    return {"method": meta.get(METADATA_PREFIX + "method", "mask"), "finetune": json.loads(record) if record else None}

"""Fold a per-channel mask on any feature tensor into the weights of the layers that read it.

:func:`cloakonnx.graph.surgery.apply_mask` multiplies a tensor by a constant mask ``m`` (one value in
[0, 1] per channel, along axis 1). When every path from that tensor reaches a linear layer only
through ops that commute with a non-negative per-channel scale (``op(x * m) == op(x) * m``), the
``Mul`` can instead be folded into the linear layers' input-channel weights, at zero run-time cost:

- pass-through ops: Relu, MaxPool, AveragePool, GlobalAveragePool, GlobalMaxPool, Identity, Dropout
  (inference), ReduceMean/ReduceMax over spatial axes only, and Flatten(axis=1), where channel ``c``
  becomes the block of columns ``c*H*W ... (c+1)*H*W - 1``;
- linear ends: Conv (grouped and depthwise too), Gemm with the data on A, MatMul with a constant 2-D
  weight. Only the weight is scaled: the mask multiplies the input, never the bias.

Anything else on a path (Add, Concat, Mul, Sigmoid, BatchNormalization, a graph output, a weight that
is not a float initializer...) makes the fold inexact or unknowable: :func:`fold_into_consumers`
returns None and the caller keeps the ``Mul``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from .fold import _consumers, _like, _unique_name
from .record import check_mask_values
from .tensors import const_array, constants, opset_version

# Ops with op(x * m) == op(x) * m for a non-negative per-channel m, that keep channels on axis 1.
_KEEP = {"Relu", "MaxPool", "AveragePool", "Identity", "Dropout"}
_GLOBAL = {"GlobalAveragePool", "GlobalMaxPool"}
_REDUCE = {"ReduceMean", "ReduceMax"}
_LINEAR = {"Conv", "Gemm", "MatMul"}
_FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


@dataclass
class _Edge:
    """A tensor on the path and the scale its features carry along axis 1 (expanded after Flatten)."""

    name: str
    scale: np.ndarray
    rank: int | None  # None when shape inference could not tell
    unit_spatial: bool = False  # known to be [N, C, 1, 1] (after a global pool)


@dataclass
class _Fold:
    """One linear consumer to rescale: its node index, the weight slot, and the scaled weight."""

    node: int
    slot: int
    weight: np.ndarray


def fold_into_consumers(model: onnx.ModelProto, tensor: str,
                        mask: np.ndarray) -> tuple[onnx.ModelProto, list[str]] | None:
    """A copy of ``model`` where the layers that read ``tensor`` see ``tensor * mask`` through their
    weights, and the names of the scaled initializers; None when that is not exact (keep the Mul).

    ``mask`` is one value in [0, 1] per channel (axis 1 of a 4-D NCHW or a 2-D [N, C] tensor); other
    values raise CloakError (as for the Mul form). The returned names are the scaled initializers as
    they are named in the new model: a weight other nodes also read is written under a new name.
    """
    values = check_mask_values(mask)
    shapes = _shapes(model)
    shape = shapes.get(tensor)
    if shape is not None and len(shape) >= 2 and shape[1] is not None and shape[1] != values.size:
        return None
    start = _Edge(tensor, values, None if shape is None else len(shape))
    folds = _walk(model, start, shapes)
    if not folds:
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out, _write(out.graph, folds)


# --- walking the consumers --------------------------------------------------------------------------------


def _walk(model: onnx.ModelProto, start: _Edge, shapes: dict[str, list[int | None]]) -> list[_Fold] | None:
    """Every linear layer downstream of ``start`` with its scaled weight, or None if any path is not
    foldable (an unlisted op, a graph output, a tensor read inside a subgraph)."""
    graph = model.graph
    readers: dict[str, list[tuple[int, int]]] = {}
    for i, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            readers.setdefault(name, []).append((i, slot))
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    folds: list[_Fold] = []
    stack = [start]
    while stack:
        edge = stack.pop()
        found = readers.get(edge.name, [])
        if edge.name in outputs or len(_consumers(graph, edge.name)) != len(found):
            return None
        for index, slot in found:
            node = graph.node[index]
            if slot != 0 or node.domain not in ("", "ai.onnx"):
                return None
            if node.op_type in _LINEAR:
                weight = _scaled_weight(node, edge, inits)
                if weight is None:
                    return None
                folds.append(_Fold(index, 1, weight))
                continue
            nxt = _pass(model, node, edge, shapes)
            if nxt is None:
                return None
            stack.append(nxt)
    return folds


def _pass(model: onnx.ModelProto, node: onnx.NodeProto, edge: _Edge,
          shapes: dict[str, list[int | None]]) -> _Edge | None:
    """The edge after a pass-through op, or None if ``node`` does not commute with the scale."""
    op = node.op_type
    outputs = {v.name for v in model.graph.output}
    if any(o and (o in outputs or _consumers(model.graph, o)) for o in node.output[1:]):
        return None  # MaxPool's indices or Dropout's mask are read: they do not carry the scale
    out = node.output[0]
    if op in _KEEP:
        if op == "Dropout" and len(node.input) > 2 and node.input[2]:
            return None  # a training_mode input: the op may really drop
        return _Edge(out, edge.scale, edge.rank, edge.unit_spatial and op in ("Relu", "Identity", "Dropout"))
    if op in _GLOBAL:
        return _Edge(out, edge.scale, edge.rank, True)
    if op in _REDUCE:
        return _reduce(model, node, edge)
    if op == "Flatten":
        return _flatten(node, edge, shapes)
    return None


def _reduce(model: onnx.ModelProto, node: onnx.NodeProto, edge: _Edge) -> _Edge | None:
    """ReduceMean/ReduceMax over spatial axes only (axes 0 and 1 kept); refused when axes are unknown."""
    attrs = _attrs(node)
    if edge.rank is None or edge.rank < 3:
        return None
    if opset_version(model) >= 18:  # axes moved from the attribute to an optional input
        given = const_array(constants(model), node.input[1]) if len(node.input) > 1 and node.input[1] else None
        raw = None if given is None else [int(a) for a in given.reshape(-1)]
    else:
        raw = [int(a) for a in attrs["axes"]] if "axes" in attrs else None
    if not raw or any(not -edge.rank <= a < edge.rank for a in raw):
        return None  # no axes reduces everything, channels included
    axes = sorted({a % edge.rank for a in raw})
    if axes[0] < 2:
        return None
    keep = bool(attrs.get("keepdims", 1))
    rank = edge.rank if keep else edge.rank - len(axes)
    unit = keep and axes == list(range(2, edge.rank))
    return _Edge(node.output[0], edge.scale, rank, unit or edge.unit_spatial)


def _flatten(node: onnx.NodeProto, edge: _Edge, shapes: dict[str, list[int | None]]) -> _Edge | None:
    """Flatten(axis=1): channel c becomes columns c*H*W ... (c+1)*H*W - 1, with H*W from shape inference."""
    axis = int(_attrs(node).get("axis", 1))
    if edge.rank is None or (axis % edge.rank if axis < 0 else axis) != 1:
        return None
    if edge.rank == 2 or edge.unit_spatial:
        return _Edge(node.output[0], edge.scale, 2)
    shape = shapes.get(edge.name)
    spatial = shape[2:] if shape is not None else [None]
    if any(d is None for d in spatial):
        return None
    block = int(np.prod(spatial))
    return _Edge(node.output[0], np.repeat(edge.scale, block), 2)


# --- the linear ends --------------------------------------------------------------------------------------


def _scaled_weight(node: onnx.NodeProto, edge: _Edge, inits: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """The weight of a Conv/Gemm/MatMul with its input features scaled by ``edge.scale`` (same dtype),
    or None if the weight is not a float initializer or its layout does not match."""
    if len(node.input) < 2:
        return None
    init = inits.get(node.input[1])
    if init is None or init.data_type not in _FLOATS or init.data_location == onnx.TensorProto.EXTERNAL:
        return None
    weight = numpy_helper.to_array(init)
    scale = edge.scale
    attrs = _attrs(node)
    if node.op_type == "Conv":
        return _scaled_conv(weight, scale, int(attrs.get("group", 1)))
    if weight.ndim != 2:
        return None
    if node.op_type == "Gemm":
        if attrs.get("transA", 0):
            return None
        axis = 1 if attrs.get("transB", 0) else 0
    else:  # MatMul contracts the last axis: only for a 2-D input is that axis 1, where the mask lies
        if edge.rank != 2:
            return None
        axis = 0
    if weight.shape[axis] != scale.size:
        return None
    shape = (-1, 1) if axis == 0 else (1, -1)
    return (weight.astype(np.float64) * scale.reshape(shape)).astype(weight.dtype)


def _scaled_conv(weight: np.ndarray, scale: np.ndarray, group: int) -> np.ndarray | None:
    """Conv weight [M, C/group, k...]: input channel c is in group g = c // (C/group), and its slice is
    W[g*(M/group):(g+1)*(M/group), c % (C/group)]."""
    if weight.ndim < 3 or group < 1 or weight.shape[0] % group:
        return None
    per_group = weight.shape[1]
    if per_group * group != scale.size:
        return None
    grouped = weight.astype(np.float64).reshape((group, weight.shape[0] // group) + weight.shape[1:])
    factor = scale.reshape((group, 1, per_group) + (1,) * (weight.ndim - 2))
    return (grouped * factor).reshape(weight.shape).astype(weight.dtype)


# --- writing ----------------------------------------------------------------------------------------------


def _write(graph: onnx.GraphProto, folds: list[_Fold]) -> list[str]:
    """Write each scaled weight: in place when the folded node is its only reader, else as a new
    initializer that only the folded node reads (the other readers keep the original values). Two
    folded nodes sharing one weight: the first gets a copy, the last (then the only reader) the original."""
    exposed = {v.name for v in list(graph.input) + list(graph.output)}
    inits = {t.name: t for t in graph.initializer}
    written = []
    for fold in folds:
        node = graph.node[fold.node]
        name = node.input[fold.slot]
        original = inits[name]
        if len(_consumers(graph, name)) == 1 and name not in exposed:
            original.CopyFrom(_like(original, fold.weight, name))
            written.append(name)
            continue
        new_name = _unique_name(graph, f"{name}_cloakonnx_folded")
        graph.initializer.append(_like(original, fold.weight, new_name))
        node.input[fold.slot] = new_name
        written.append(new_name)
    return written


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Tensor shapes from shape inference (a dim is None when not a fixed size); best effort."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # noqa: BLE001 - without shapes, only the steps that need them refuse
        inferred = model
    shapes = {}
    g = inferred.graph
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[vi.name] = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                               for d in tt.shape.dim]
    return shapes

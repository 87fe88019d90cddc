"""Fold a DeepCloak mask into the head's weights: the "folded" form, with zero added cost.

Masking feature j before the head, ``logits = (f * m) @ W + b``, is the same as zeroing row j of
``W`` (``logits = f @ (m[:, None] * W) + b``). So instead of a Mul node, :func:`fold_mask` zeroes
the masked rows of the head's weight initializer:

- ``Gemm`` with ``transB=0`` (B is [F, C]): rows of B; with ``transB=1`` (B is [C, F]): columns.
  ``alpha``, ``beta`` and the bias are untouched (scaling a zero row keeps it zero).
- ``MatMul`` + ``Add`` and a bare ``MatMul`` (W is [F, C]): rows of W.

The graph keeps exactly the original's nodes, inputs and outputs. If the model already carries a
cloak Mul mask before the head, that Mul is removed and the union of its mask and the new one is
folded, so the result has the node count of the un-hardened model. A weight that another node also
reads (or that is a graph input or output) is not changed: the head gets its own new initializer.

Only the weight values change, so the result is written into a copy of the original ModelProto:
IR version, opset imports, producer, doc string, metadata and value_info stay as they were. The
folded mask is recorded in ``cloakonnx.folded_mask`` (read it back with :func:`folded_mask`),
because a folded model no longer shows its mask as a node.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CloakError
from .head import PASS_THROUGH, Head, find_head
from .record import (FOLDED, FOLDED_MASK_KEY, FORM_KEY, check_mask_values, encode_folded, folded_mask, is_soft,
                     set_metadata)
from .tensors import constants, per_axis


@dataclass
class _Target:
    """The node and input slot that hold the head's weight, and how the features lie in it."""

    node: onnx.NodeProto
    slot: int  # the weight's input index in ``node``
    feature_axis: int  # the axis of the weight indexed by feature


def fold_mask(model: onnx.ModelProto, mask: np.ndarray, metadata: dict[str, str] | None = None) -> onnx.ModelProto:
    """Return a copy of ``model`` whose head weight has the masked features' rows set to zero.

    ``mask`` holds one 0/1 entry per head feature (0 = masked). An existing cloak Mul before the head
    is removed and its mask united with ``mask``; a mask already folded (recorded in the metadata)
    is united too. ``metadata`` is added with :func:`cloakonnx.graph.record.set_metadata`, then
    ``cloakonnx.form = folded`` and ``cloakonnx.folded_mask`` record what was done.
    """
    head = _find_head(model)
    values = check_mask_values(mask)
    if values.size != head.width:
        raise CloakError(f"the mask has {values.size} entries but the head has {head.width} features")
    if head.mask is not None:
        if head.mask.size != head.width:
            raise CloakError(f"the existing cloak mask has {head.mask.size} entries, the head {head.width} features")
        values = values * head.mask
    earlier = folded_mask(model)
    if earlier is not None:
        if earlier.size != head.width:
            raise CloakError(f"the recorded folded mask has {earlier.size} entries, the head {head.width} features")
        values = values * earlier

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    target = _locate(graph, head)
    if head.mask is not None:
        _remove_mask_node(graph, head, target.node)
    _scale_weight(graph, target, values, head.width)

    set_metadata(out, metadata or {})
    set_metadata(out, {FORM_KEY: FOLDED, FOLDED_MASK_KEY: encode_folded(values)})
    return out


# --- finding the head -------------------------------------------------------------------------------------


def _find_head(model: onnx.ModelProto) -> Head:
    """find_head, with a precise reason when the head exists but cannot be folded."""
    try:
        return find_head(model)
    except CloakError as exc:
        reason = _why_unfoldable(model)
        if reason:
            raise CloakError(f"cannot fold the mask: {reason}; use the Mul form (harden without --fold)") from exc
        raise


def _why_unfoldable(model: onnx.ModelProto) -> str | None:
    consts = constants(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    for out in model.graph.output:
        node = producers.get(out.name)
        while node is not None and node.op_type in PASS_THROUGH:
            node = producers.get(node.input[0])
        if node is None:
            continue
        if node.op_type == "Add":
            node = next((producers[t] for t in node.input if t in producers and producers[t].op_type == "MatMul"),
                        node)
        if node.op_type == "Gemm":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0):
                return f"the head Gemm {node.name!r} has transA=1 (only transA=0 is supported)"
            if node.input[1] not in consts:
                return f"the head Gemm {node.name!r} takes its weight {node.input[1]!r} from a non-constant tensor"
            if len(node.input) > 2 and node.input[2] and node.input[2] not in consts:
                return f"the head Gemm {node.name!r} takes its bias {node.input[2]!r} from a non-constant tensor"
        if node.op_type == "MatMul":
            if node.input[1] not in consts:
                return f"the head MatMul {node.name!r} takes its weight {node.input[1]!r} from a non-constant tensor"
            dims = list(consts[node.input[1]].dims)
            if len(dims) != 2:
                return f"the head MatMul {node.name!r} has a weight of shape {dims} (only 2-D weights are supported)"
    return None


def _locate(graph: onnx.GraphProto, head: Head) -> _Target:
    """The head's linear node in ``graph``, found from the logits (node names may be empty or repeated)."""
    producers = {o: n for n in graph.node for o in n.output}
    node = producers.get(head.logits)
    while node is not None and node.op_type in PASS_THROUGH:
        node = producers.get(node.input[0])
    if node is not None and node.op_type == "Add" and head.kind == "MatMul+Add":
        node = next((producers[t] for t in node.input if t in producers and producers[t].op_type == "MatMul"
                     and producers[t].name == head.nodes[0]), None)
    if node is None or node.op_type != head.kind.split("+")[0]:
        raise CloakError(f"could not locate the head node {head.nodes[0]!r} in the graph")  # pragma: no cover
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        return _Target(node, 1, 1 if attrs.get("transB", 0) else 0)
    return _Target(node, 1, 0)


# --- rewriting --------------------------------------------------------------------------------------------


def _consumers(graph: onnx.GraphProto, name: str) -> list[tuple[onnx.NodeProto, int]]:
    """Every (node, input index) that reads ``name``, including nodes inside subgraphs."""
    found = []
    for node in graph.node:
        found += [(node, i) for i, t in enumerate(node.input) if t == name]
        for attr in node.attribute:
            subgraphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
            for sub in subgraphs:
                found += _consumers(sub, name)
    return found


def _remove_mask_node(graph: onnx.GraphProto, head: Head, head_node: onnx.NodeProto) -> None:
    """Drop the cloak Mul in front of the head (and its constant), wiring the head to the raw features."""
    mul = next(n for n in graph.node if n.op_type == "Mul" and n.name == head.mask_node and head.feature in n.input
               and head_node.input[0] in n.output)
    masked = mul.output[0]
    others = [n for n, _ in _consumers(graph, masked) if n is not head_node]
    if others or masked in {o.name for o in graph.output}:
        what = ", ".join(repr(n.name or n.op_type) for n in others) or "a graph output"
        raise CloakError(f"the cloak mask {mul.name!r} also feeds {what}; removing it to fold would change them")
    head_node.input[0] = head.feature
    const_name = next(t for t in mul.input if t != head.feature)
    graph.node.remove(mul)
    _drop_value_info(graph, masked)
    if not _consumers(graph, const_name) and const_name not in {o.name for o in graph.output}:
        for i, t in enumerate(graph.initializer):
            if t.name == const_name:
                del graph.initializer[i]
                break
        else:
            maker = next((n for n in graph.node if n.op_type == "Constant" and const_name in n.output), None)
            if maker is not None:
                graph.node.remove(maker)
        _drop_value_info(graph, const_name)


def _drop_value_info(graph: onnx.GraphProto, name: str) -> None:
    for i in reversed(range(len(graph.value_info))):
        if graph.value_info[i].name == name:
            del graph.value_info[i]


def _scale_weight(graph: onnx.GraphProto, target: _Target, values: np.ndarray, width: int) -> None:
    """Zero (and, for a soft mask, scale) the weight along its feature axis, in place or, if the
    weight is shared, in a new tensor."""
    zero = np.flatnonzero(values == 0)
    name = target.node.input[target.slot]
    init = next((t for t in graph.initializer if t.name == name), None)
    if init is None:
        dq = next((n for n in graph.node if n.op_type == "DequantizeLinear" and name in n.output), None)
        if dq is not None:
            if is_soft(values):
                raise CloakError("cannot fold a soft mask into quantized (QDQ) weights: integer weights cannot be "
                                 "scaled exactly; use the Mul form or --mask-values binary")
            _zero_quantized_weight(graph, target, dq, zero, width)
            return
        maker = next((n for n in graph.node if n.op_type == "Constant" and name in n.output), None)
        if maker is None:
            raise CloakError(f"cannot fold the mask: the head weight {name!r} is not a constant")  # pragma: no cover
        attr = next((a for a in maker.attribute if a.name == "value"), None)
        if attr is None:
            raise CloakError(f"cannot fold the mask: the head weight {name!r} is a Constant without a tensor value")
        tensor = attr.t
    else:
        tensor = init
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        raise CloakError(f"the head weight {name!r} is stored as external data that was not loaded; "
                         "load the model with its external data to fold the mask")
    weight = numpy_helper.to_array(tensor)
    if weight.ndim != 2 or weight.shape[target.feature_axis] != width:
        raise CloakError(f"the head weight {name!r} has shape {list(weight.shape)}, expected {width} features "
                         f"along axis {target.feature_axis}")
    soft = np.flatnonzero((values > 0) & (values < 1))
    if zero.size == 0 and soft.size == 0:
        return  # nothing to fold: the weight stays byte for byte as it was
    folded = np.array(weight, copy=True)  # same dtype (fp16, bf16...): zeros are set, not multiplied
    index = [slice(None)] * 2
    index[target.feature_axis] = zero
    folded[tuple(index)] = 0
    if soft.size:
        index[target.feature_axis] = soft
        shape = (-1, 1) if target.feature_axis == 0 else (1, -1)
        scaled = weight[tuple(index)].astype(np.float64) * values[soft].reshape(shape)
        folded[tuple(index)] = scaled.astype(weight.dtype)

    shared = [n for n, i in _consumers(graph, name) if not (n is target.node and i == target.slot)]
    exposed = name in {v.name for v in graph.input} or name in {v.name for v in graph.output}
    if shared or exposed:
        new_name = _unique_name(graph, f"{name}_cloakonnx_folded")
        graph.initializer.append(_like(tensor, folded, new_name))
        target.node.input[target.slot] = new_name
    else:
        tensor.CopyFrom(_like(tensor, folded, name))


def _zero_quantized_weight(graph: onnx.GraphProto, target: _Target, dq: onnx.NodeProto, zero: np.ndarray,
                           width: int) -> None:
    """QDQ head: set the masked entries of the integer weight to its zero point, so that
    DequantizeLinear yields exact zeros; scales, zero points and the graph stay as they were."""
    if [n for n, _ in _consumers(graph, dq.output[0]) if n is not target.node]:
        raise CloakError(f"cannot fold the mask: the dequantized head weight {dq.output[0]!r} also feeds other "
                         "nodes; use the Mul form")
    q_name = dq.input[0]
    q_init = next((t for t in graph.initializer if t.name == q_name), None)
    if q_init is None:
        raise CloakError(f"cannot fold the mask: the quantized head weight {q_name!r} is not an initializer")
    q = numpy_helper.to_array(q_init)
    if q.ndim != 2 or q.shape[target.feature_axis] != width:
        raise CloakError(f"the quantized head weight {q_name!r} has shape {list(q.shape)}, expected {width} "
                         f"features along axis {target.feature_axis}")
    if zero.size == 0:
        return
    zp_name = dq.input[2] if len(dq.input) > 2 else ""
    zp_init = next((t for t in graph.initializer if t.name == zp_name), None) if zp_name else None
    if zp_name and zp_init is None:
        raise CloakError(f"cannot fold the mask: the zero point {zp_name!r} of the head weight is not an initializer")
    zp = numpy_helper.to_array(zp_init) if zp_init is not None else np.zeros((), q.dtype)
    zp = per_axis(zp, 2, next((a.i for a in dq.attribute if a.name == "axis"), 1))
    folded = np.array(q, copy=True)
    index = [slice(None)] * 2
    index[target.feature_axis] = zero
    folded[tuple(index)] = np.broadcast_to(zp, q.shape)[tuple(index)]
    if [n for n, _ in _consumers(graph, q_name) if n is not dq] or q_name in {v.name for v in graph.input}:
        new_name = _unique_name(graph, f"{q_name}_cloakonnx_folded")
        graph.initializer.append(_like(q_init, folded, new_name))
        dq.input[0] = new_name
    else:
        q_init.CopyFrom(_like(q_init, folded, q_name))


def _like(original: onnx.TensorProto, values: np.ndarray, name: str) -> onnx.TensorProto:
    """A tensor holding ``values`` that keeps the original's doc string and metadata."""
    new = numpy_helper.from_array(values, name)
    if original.HasField("doc_string"):
        new.doc_string = original.doc_string
    if len(getattr(original, "metadata_props", ())):
        new.metadata_props.extend(original.metadata_props)
    return new


def _unique_name(graph: onnx.GraphProto, base: str) -> str:
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {
        v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)}
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name

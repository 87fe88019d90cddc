"""Facts about a graph's tensors: inputs, element types, constants (QDQ weights included), and
intermediate tensors exposed as outputs (as onnxruntime's calibrator does)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import CloakError


@dataclass
class TensorInfo:
    name: str
    shape: list[Any]
    dtype: str


def tensor_elem_type(model: onnx.ModelProto, name: str) -> int:
    """The ONNX element type of any tensor in the graph (shape inference as a fallback; float if unknown)."""
    for vi in list(model.graph.value_info) + list(model.graph.output) + list(model.graph.input):
        if vi.name == name and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    for t in model.graph.initializer:
        if t.name == name:
            return t.data_type
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
        for vi in inferred.graph.value_info:
            if vi.name == name and vi.type.tensor_type.elem_type:
                return vi.type.tensor_type.elem_type
    except Exception:  # noqa: BLE001 - inference is best effort; float is the common case
        pass
    return onnx.TensorProto.FLOAT


def opset_version(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0


def constants(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Tensors whose value is known without running the graph: initializers, Constant nodes, and
    DequantizeLinear of those (the weights of QDQ-quantized models)."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    out[node.output[0]] = attr.t
        elif node.op_type == "DequantizeLinear" and node.domain in ("", "ai.onnx"):
            value = dequantized_constant(node, out)
            if value is not None:
                out[node.output[0]] = numpy_helper.from_array(value, node.output[0])
    return out


def dequantized_constant(node: onnx.NodeProto, consts: dict) -> np.ndarray | None:
    """``(x - zero_point) * scale`` of a DequantizeLinear whose inputs are all constants, else None."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("block_size", 0):
        return None
    arrays = [const_array(consts, name) if name else None for name in node.input]
    if any(a is None for a, name in zip(arrays, node.input) if name):
        return None
    x, scale = arrays[0], arrays[1]
    zp = arrays[2] if len(arrays) > 2 else None
    if x.dtype.kind not in "iu":
        return None  # float8 and other encodings are not folded here
    axis = attrs.get("axis", 1)
    y = x.astype(np.float32)
    if zp is not None:
        y = y - per_axis(zp.astype(np.float32), x.ndim, axis)
    return (y * per_axis(scale.astype(np.float32), x.ndim, axis)).astype(scale.dtype)


def is_qdq(model: onnx.ModelProto) -> bool:
    """True for QDQ-quantized graphs (QuantizeLinear/DequantizeLinear of the default domain)."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") and n.domain in ("", "ai.onnx")
               for n in model.graph.node)


def per_axis(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """A quantization scale or zero point (one value, or one per index of ``axis``) shaped to
    broadcast against a tensor of rank ``ndim``."""
    if v.size == 1 or ndim == 0:
        return v.reshape(())
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


def tensor_infos(values) -> list[TensorInfo]:
    infos = []
    for v in values:
        tt = v.type.tensor_type
        # -1 and 0 (as Paddle writes a dynamic batch), a dim_param and an absent dim all mean dynamic
        shape = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else (d.dim_param or None)
                 for d in tt.shape.dim]
        infos.append(TensorInfo(v.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                                if tt.elem_type else "unknown"))
    return infos


def model_inputs(model: onnx.ModelProto) -> list[TensorInfo]:
    """Graph inputs that are real inputs, not initializers listed as inputs (old exporters do that)."""
    inits = {t.name for t in model.graph.initializer}
    return [i for i in tensor_infos(model.graph.input) if i.name not in inits]


def select_input(model: onnx.ModelProto, name: str | None = None) -> TensorInfo:
    inputs = model_inputs(model)
    if name:
        for i in inputs:
            if i.name == name:
                return i
        raise CloakError(f"model has no input named {name!r}; inputs: {', '.join(i.name for i in inputs)}")
    if len(inputs) != 1:
        raise CloakError(
            f"model has {len(inputs)} inputs ({', '.join(i.name for i in inputs)}); "
            "cloakonnx needs one image input: choose it with --input NAME"
        )
    return inputs[0]


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in model.graph.node for o in n.output}


def const_array(consts: dict, name: str) -> np.ndarray | None:
    t = consts.get(name)
    return None if t is None else numpy_helper.to_array(t)


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also returns the named intermediate tensors."""
    known = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    missing = [n for n in names if n not in known]
    if missing:
        raise CloakError(f"no tensor named {', '.join(map(repr, missing))} in the model; "
                         "`cloakonnx inspect MODEL` lists the feature tensor and candidates")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for n in names:
        if n not in present:
            out.graph.output.append(onnx.helper.make_tensor_value_info(n, tensor_elem_type(model, n), None))
    return out

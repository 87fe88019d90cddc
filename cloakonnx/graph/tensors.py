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


def fixed_size(dim) -> int | None:
    """The size of a fixed dimension, or None for a dynamic one. -1 and 0 (as Paddle writes a dynamic
    batch), a dim_param and an absent value all mean dynamic, whether ``dim`` is an ONNX Dimension,
    an entry of a TensorInfo's shape or of onnxruntime's."""
    if isinstance(dim, onnx.TensorShapeProto.Dimension):
        dim = dim.dim_value if dim.HasField("dim_value") else None
    return dim if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0 else None


def tensor_infos(values) -> list[TensorInfo]:
    infos = []
    for v in values:
        tt = v.type.tensor_type
        shape = [fixed_size(d) or d.dim_param or None for d in tt.shape.dim]
        infos.append(TensorInfo(v.name, shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name
                                if tt.elem_type else "unknown"))
    return infos


def without_unset_dims(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with input dims written as 0 or -1 left without a value, for onnxruntime: it reads 0
    as a fixed size 0, where cloakonnx reads it as dynamic. The model itself when there are none."""

    def unset(vi):
        return [d for d in vi.type.tensor_type.shape.dim if d.HasField("dim_value") and fixed_size(d) is None]

    if not any(unset(vi) for vi in model.graph.input):
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        for d in unset(vi):
            d.ClearField("dim_value")
    return out


def show_shape(shape) -> str:
    """``[batch,3,?,?]``: as --input-shapes takes it, a dynamic dim by its name or ``?``."""
    return "[" + ",".join(str(d) if d is not None else "?" for d in shape) + "]"


def check_input_shapes(input_shapes: dict) -> None:
    """Given shapes are shapes to run with: positive integer dims, no dynamic ones."""
    for name, shape in input_shapes.items():
        if not isinstance(name, str) or not name:
            raise CloakError(f"--input-shapes needs an input name for each shape, got {name!r}")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
            raise CloakError(f"--input-shapes {name}:{show_shape(shape)}: every dim must be a positive integer "
                             "(a shape to run with, not a dynamic one)")


def model_inputs(model: onnx.ModelProto, input_shapes: dict | None = None) -> list[TensorInfo]:
    """Graph inputs that are real inputs, not initializers listed as inputs (old exporters do that).

    With ``input_shapes`` (name -> shape, as --input-shapes gives them) those inputs carry the given
    shapes, checked first: every name must be an input, and a given shape must keep the input's rank
    and every dim the model fixes."""
    inits = {t.name for t in model.graph.initializer}
    values = [vi for vi in model.graph.input if vi.name not in inits]
    infos = tensor_infos(values)
    if not input_shapes:
        return infos
    check_input_shapes(input_shapes)
    by_name = {info.name: (vi, info) for vi, info in zip(values, infos)}
    for name, shape in input_shapes.items():
        if name not in by_name:
            raise CloakError(f"--input-shapes names {name!r}, which is not a model input; "
                             f"inputs: {', '.join(i.name for i in infos) or 'none'}")
        vi, info = by_name[name]
        shape = [int(d) for d in shape]
        if vi.type.tensor_type.HasField("shape"):  # an input with no declared shape takes any
            declared = info.shape
            if len(shape) != len(declared):
                raise CloakError(f"--input-shapes gives {name!r} {len(shape)} dims, {show_shape(shape)}, but the "
                                 f"model declares {len(declared)}: {show_shape(declared)}")
            for i, (want, have) in enumerate(zip(shape, declared)):
                if fixed_size(have) is not None and want != have:
                    raise CloakError(f"--input-shapes gives {name!r} dim {i} = {want}, but the model fixes dim {i} "
                                     f"to {have} (declared shape {show_shape(declared)})")
        info.shape = shape
    return infos


def select_input(model: onnx.ModelProto, name: str | None = None, input_shapes: dict | None = None) -> TensorInfo:
    """The image input (``name``, or the only one), with its given shape if ``input_shapes`` has one."""
    inputs = model_inputs(model, input_shapes)
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

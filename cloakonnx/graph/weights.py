"""The weights a fine-tuning may move, and the graph rewrites it needs (torch-free, like the rest of ``graph/``).

- :func:`trainable_initializers`: the float initializers that are weights and biases of linear
  layers (Conv, ConvTranspose, Gemm, MatMul, the Add after a MatMul) or scales and biases of a
  normalisation; ``norm`` keeps the normalisation ones, ``head`` the final head's weight and bias.
  Quantized (QDQ) or integer weights are refused, naming the tensor. Weights held in Constant
  nodes (Paddle's exporter writes every weight that way) count as initializers here: they are
  read from, and written back to, the node's ``value``.
- :func:`with_weight_inputs`: a copy where those initializers are graph inputs, so the torch
  executor takes them as inputs and autograd reaches them. It is never served.
- :func:`with_weights`: a copy with only those initializers' values replaced: same names, dtypes
  (float16 cast back from a float32 master copy), shapes, nodes, opset and metadata.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from ..errors import CloakError
from .head import find_head
from .tensors import producers

PARAM_SETS = ("all", "norm", "head")
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}
# op -> the input slots that hold its weight and bias
LINEAR = {"Conv": (1, 2), "ConvTranspose": (1, 2), "Gemm": (1, 2), "MatMul": (0, 1)}
NORM = {"BatchNormalization": (1, 2), "InstanceNormalization": (1, 2), "LayerNormalization": (1, 2),
        "GroupNormalization": (1, 2)}
# integer-arithmetic ops -> the slots of their (quantized) weights
INTEGER_OPS = {"ConvInteger": (1,), "MatMulInteger": (0, 1), "QLinearConv": (3,), "QLinearMatMul": (0, 3)}


def trainable_initializers(model: onnx.ModelProto, params: str = "all") -> list[str]:
    """The names of the float initializers ``params`` selects, each once, in graph order: "all" (linear
    weights and biases, normalisation scales and biases), "norm" (normalisation only) or "head"."""
    if params not in PARAM_SETS:
        raise CloakError(f"--finetune-params must be one of {', '.join(PARAM_SETS)}, got {params!r}")
    inits = stored_tensors(model)
    _refuse_quantized(model, inits)
    if params == "head":
        names = _head_initializers(model, inits)
    else:
        slots = NORM if params == "norm" else {**LINEAR, **NORM}
        names = []
        made_by = producers(model)
        for node in model.graph.node:
            picked = [node.input[i] for i in slots.get(node.op_type, ()) if i < len(node.input)]
            if node.op_type == "Add" and params == "all":  # the bias of MatMul + Add
                picked = [a for a, b in (node.input[:2], node.input[1::-1]) if b in made_by
                          and made_by[b].op_type == "MatMul"]
            picked = [_stored(made_by, n) for n in picked]
            names += [n for n in picked if n in inits and inits[n].data_type in FLOAT_TYPES]
    names = list(dict.fromkeys(names))
    if not names:
        raise CloakError(f"the model has no float initializers for --finetune-params {params} to fine-tune")
    return names


def stored_tensors(model: onnx.ModelProto) -> dict[str, TensorProto]:
    """Every tensor stored in the graph, by name: the initializers and the ``value`` of each Constant
    node (the tensor itself, so that writing to it writes the model)."""
    out = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.output:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if value is not None:
                out[node.output[0]] = value
    return out


def _stored(made_by: dict, name: str) -> str:
    """The tensor behind a chain of Identity nodes (torch.onnx shares equal initializers that way)."""
    seen = set()
    while name in made_by and made_by[name].op_type == "Identity" and name not in seen:
        seen.add(name)
        name = made_by[name].input[0]
    return name


def _refuse_quantized(model: onnx.ModelProto, inits: dict) -> None:
    """Refuse weights stored as integers (QDQ, or integer-arithmetic ops), naming the first one."""
    made_by = producers(model)
    for node in model.graph.node:
        slots = [node.input[i] for i in INTEGER_OPS.get(node.op_type, ()) if i < len(node.input) and node.input[i]]
        if slots:
            weight = next((n for n in slots if n in inits), slots[0])  # the stored one, if any
            raise CloakError(f"the weight {weight!r} of {node.op_type} node {node.name!r} is quantized: "
                             "fine-tuning moves float weights; fine-tune the float model, then quantize it")
        for i in {**LINEAR, **NORM}.get(node.op_type, ()):
            name = _stored(made_by, node.input[i]) if i < len(node.input) else ""
            dq = made_by.get(name)
            if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
                raise CloakError(f"the weight {dq.input[0]!r} of {node.op_type} node {node.name!r} is quantized "
                                 "(QDQ): fine-tuning moves float weights; fine-tune the float model, then quantize it")
            if name in inits and inits[name].data_type not in FLOAT_TYPES and node.op_type != "MatMul":
                dtype = TensorProto.DataType.Name(inits[name].data_type)
                raise CloakError(f"the weight {name!r} of {node.op_type} node {node.name!r} is {dtype}: "
                                 "fine-tuning moves float32, float16 or float64 weights")


def _head_initializers(model: onnx.ModelProto, inits: dict) -> list[str]:
    """The weight and bias initializers of the head that produces the logits."""
    head = find_head(model)
    nodes, made_by = {n.name: n for n in model.graph.node}, producers(model)
    names = []
    for node in (nodes[n] for n in head.nodes):
        slots = (1, 2) if node.op_type == "Gemm" else (0, 1)
        stored = [_stored(made_by, node.input[i]) for i in slots if i < len(node.input) and node.input[i]]
        names += [n for n in stored if n in inits]
    missing = [n for n in names if inits[n].data_type not in FLOAT_TYPES]
    if missing:
        raise CloakError(f"the head's weight {missing[0]!r} is not a float tensor: it cannot be fine-tuned")
    if not names:
        raise CloakError(f"the head ({', '.join(head.nodes)}) computes its weights instead of storing them: "
                         "use --finetune-params all or norm")
    return names


def initializer_values(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """The named initializers as float32 arrays (the master copy a fine-tuning moves)."""
    inits = stored_tensors(model)
    missing = [n for n in names if n not in inits]
    if missing:
        raise CloakError(f"no initializer named {', '.join(map(repr, missing))} in the model")
    return {n: numpy_helper.to_array(inits[n]).astype(np.float32) for n in names}


def with_weight_inputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of ``model`` where each named initializer is a graph input of the same name, dtype and
    shape instead (appended after the other inputs): the model fine-tuning runs through the torch
    executor, with gradients to the weights. It is never served."""
    initializer_values(model, names)  # every name must be stored in the graph
    wanted = set(names)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    moved = {n: t for n, t in stored_tensors(out).items() if n in wanted}
    kept = [t for t in out.graph.initializer if t.name not in wanted]
    nodes = [n for n in out.graph.node if not (n.op_type == "Constant" and n.output and n.output[0] in wanted)]
    inputs = [i for i in out.graph.input if i.name not in wanted]  # old IRs list initializers as inputs too
    del out.graph.initializer[:]
    out.graph.initializer.extend(kept)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    del out.graph.input[:]
    out.graph.input.extend(inputs)
    for name in names:
        t = moved[name]
        out.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return out


def with_weights(model: onnx.ModelProto, values: dict[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` with the named initializers' values replaced, each cast to its own dtype
    and checked against its shape; everything else is left as it was."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = stored_tensors(out)
    for name, value in values.items():
        if name not in inits:
            raise CloakError(f"no initializer named {name!r} in the model")
        old = inits[name]
        value = np.asarray(value)
        if tuple(value.shape) != tuple(old.dims):
            raise CloakError(f"new values for {name!r} have shape {list(value.shape)}, "
                             f"the initializer {list(old.dims)}")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(old.data_type)
        new = numpy_helper.from_array(value.astype(dtype), old.name)
        new.doc_string = old.doc_string
        old.CopyFrom(new)
    return out


def relative_change(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> dict[str, float]:
    """Per tensor: ||after - before|| / ||before|| (the change itself where ``before`` is zero)."""
    out = {}
    for name, w0 in before.items():
        w0 = w0.astype(np.float64)
        diff = float(np.linalg.norm(after[name].astype(np.float64) - w0))
        norm = float(np.linalg.norm(w0))
        out[name] = diff / norm if norm > 0 else diff
    return out

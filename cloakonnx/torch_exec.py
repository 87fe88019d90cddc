"""Run an ONNX graph with torch ops, so attacks get gradients with respect to the input.

onnxruntime has no autograd, and the public ONNX->torch converters fail on current exports
(opset 18+ op versions, shared initializers, BatchNormalization's training_mode; see DESIGN.md).
So this module interprets the graph itself:

* an op table keyed by ``(op_type, since_version)``; the handler used for a node is the one with
  the largest since_version not above the model's opset for the default domain, so supporting a
  new op version is one small function plus one decorator line;
* a plan built once per model: topological node order, the handler resolved per node, attributes
  parsed once, all-constant subgraphs folded, constants registered as buffers (so ``.to(device)``
  moves them), and for every step the intermediates whose last reader it is, freed right after;
* float16/bfloat16/float64 tensors are computed in float32 (``computes_in_float32`` says so).

Handlers take ``(inputs, attrs, ctx)``: ``inputs`` is a list of tensors (None for an omitted
optional input), ``attrs`` the node's parsed attributes, ``ctx`` a :class:`NodeContext`; they
return a tuple of outputs. Run-time shapes are int64 tensors and become Python ints via
``.tolist()`` where torch needs them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

from .errors import CloakError

__all__ = ["UnsupportedOpsError", "unsupported_ops", "OnnxTorchModule", "supported_ops", "NodeContext"]

DEFAULT_DOMAINS = ("", "ai.onnx")

# ONNX element type -> torch dtype used for computing. Low/high precision floats run in float32.
_FLOAT32_STANDINS = {TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.FLOAT16: torch.float32,
    TensorProto.BFLOAT16: torch.float32,
    TensorProto.DOUBLE: torch.float32,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT16: torch.uint16,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.UINT32: torch.uint32,
    TensorProto.UINT64: torch.uint64,
    TensorProto.BOOL: torch.bool,
}
_INT64_MAX = 2**63 - 1


class UnsupportedOpsError(CloakError):
    """The model uses ops (or op settings) the torch executor cannot run; all are listed at once."""

    def __init__(self, ops: list[tuple[str, int]], reasons: dict[tuple[str, int], str] | None = None):
        self.ops = list(ops)
        self.reasons = dict(reasons or {})
        parts = []
        for op_type, version in self.ops:
            domain, _, name = op_type.rpartition("::")
            text = f"{domain or 'ai.onnx'}::{name} (opset {version})"
            if (op_type, version) in self.reasons:
                text += f": {self.reasons[(op_type, version)]}"
            parts.append(text)
        super().__init__(
            f"the torch executor does not support {len(self.ops)} op(s) used by this model: "
            + "; ".join(parts)
            + ". Re-export the model with a supported opset, or ask for these ops to be added."
        )


# --------------------------------------------------------------------------------------------
# The op table
# --------------------------------------------------------------------------------------------

Handler = Callable[[list, dict, "NodeContext"], Sequence]
Check = Callable[[dict, "NodeContext"], "str | None"]


@dataclass
class _OpVersion:
    since: int
    fn: Handler
    check: Check | None


_OPS: dict[str, list[_OpVersion]] = {}


def op(name: str, *versions: int, check: Check | None = None):
    """Register a handler for ``name`` from each of ``versions`` (ONNX since_version) on."""

    def register(fn: Handler) -> Handler:
        entries = _OPS.setdefault(name, [])
        for v in versions:
            entries.append(_OpVersion(v, fn, check))
        entries.sort(key=lambda e: e.since)
        return fn

    return register


def _resolve(op_type: str, opset: int) -> _OpVersion | None:
    """The handler with the largest since_version <= opset, or None."""
    best = None
    for entry in _OPS.get(op_type, ()):
        if entry.since <= opset:
            best = entry
    return best


def supported_ops() -> dict[str, list[int]]:
    """Op type -> the since_versions that have their own handler (for docs and diagnostics)."""
    return {name: [e.since for e in entries] for name, entries in sorted(_OPS.items())}


@dataclass
class NodeContext:
    """What a handler may need about its node besides inputs and attributes; built once."""

    name: str
    op_type: str
    opset: int
    since: int
    outputs: list[str]
    cache: dict = field(default_factory=dict)  # handler-owned memo (e.g. resize indices per shape)

    @property
    def n_outputs(self) -> int:
        return len(self.outputs)

    def wants(self, i: int) -> bool:
        """True when output ``i`` exists and has a name (optional outputs may be omitted)."""
        return i < len(self.outputs) and bool(self.outputs[i])


# --------------------------------------------------------------------------------------------
# Small helpers
# --------------------------------------------------------------------------------------------


def _ints(t) -> list[int] | None:
    """A run-time int tensor (or list) as Python ints; None stays None."""
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        return [int(v) for v in t.reshape(-1).tolist()]
    return [int(v) for v in t]


def _floats(t) -> list[float] | None:
    if t is None:
        return None
    return [float(v) for v in t.reshape(-1).tolist()]


def _scalar(t):
    return t.reshape(-1)[0].item() if isinstance(t, torch.Tensor) else t


def _empty(t) -> bool:
    return t is None or (isinstance(t, torch.Tensor) and t.numel() == 0)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _norm_axes(axes, rank: int) -> list[int]:
    return [_norm_axis(int(a), rank) for a in axes]


def _pt_pad(begins: Sequence[int], ends: Sequence[int]) -> list[int]:
    """ONNX per-axis (begin, end) pads for trailing axes -> torch F.pad order (last axis first)."""
    out: list[int] = []
    for b, e in zip(reversed(list(begins)), reversed(list(ends))):
        out += [int(b), int(e)]
    return out


def _is_float(t: torch.Tensor) -> bool:
    return t.is_floating_point()


def _onnx_dtype(elem_type: int) -> torch.dtype:
    try:
        return _DTYPES[elem_type]
    except KeyError:
        name = TensorProto.DataType.Name(elem_type) if elem_type in TensorProto.DataType.values() else elem_type
        raise CloakError(f"the torch executor cannot hold ONNX tensors of type {name}") from None


def tensor_from_proto(proto: onnx.TensorProto) -> torch.Tensor:
    """An ONNX TensorProto as a torch tensor, floats in float32."""
    dtype = _onnx_dtype(proto.data_type)
    arr = numpy_helper.to_array(proto)
    if proto.data_type in _FLOAT32_STANDINS:
        arr = arr.astype(np.float32)
    arr = np.array(arr, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    if dtype in (torch.uint16, torch.uint32, torch.uint64):
        return torch.from_numpy(arr.astype(np.int64)).to(dtype)
    return torch.from_numpy(arr).to(dtype)


def _sparse_to_dense(sp: onnx.SparseTensorProto) -> torch.Tensor:
    values = tensor_from_proto(sp.values).reshape(-1)
    idx = tensor_from_proto(sp.indices).to(torch.int64)
    shape = list(sp.dims)
    dense = torch.zeros(int(np.prod(shape)) if shape else 1, dtype=values.dtype)
    if idx.dim() == 2:  # coordinates -> linear indices
        strides = torch.tensor([int(np.prod(shape[i + 1 :])) for i in range(len(shape))])
        idx = (idx * strides).sum(1)
    dense[idx.reshape(-1)] = values
    return dense.reshape(shape)


def _parse_attr(a: onnx.AttributeProto):
    A = onnx.AttributeProto
    if a.type == A.FLOAT:
        return float(a.f)
    if a.type == A.INT:
        return int(a.i)
    if a.type == A.STRING:
        return a.s.decode("utf-8", "replace")
    if a.type == A.FLOATS:
        return [float(v) for v in a.floats]
    if a.type == A.INTS:
        return [int(v) for v in a.ints]
    if a.type == A.STRINGS:
        return [s.decode("utf-8", "replace") for s in a.strings]
    if a.type == A.TENSOR:
        return tensor_from_proto(a.t)
    if a.type == A.SPARSE_TENSOR:
        return _sparse_to_dense(a.sparse_tensor)
    if a.type == A.TENSORS:
        return [tensor_from_proto(t) for t in a.tensors]
    return _UNPARSED  # graphs, type protos: no supported op takes them


_UNPARSED = object()


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: _parse_attr(a) for a in node.attribute}


# --------------------------------------------------------------------------------------------
# Elementwise ops
# --------------------------------------------------------------------------------------------


def _legacy_broadcast(a, b, attrs):
    """Opset < 7 Add/Sub/Mul/Div: with broadcast=1 and axis, b aligns to a starting at axis."""
    if attrs.get("broadcast", 0) and "axis" in attrs and b.dim() < a.dim():
        axis = _norm_axis(attrs["axis"], a.dim())
        b = b.reshape(tuple(b.shape) + (1,) * (a.dim() - axis - b.dim()))
    return a, b


def _binary(fn):
    def handler(inputs, attrs, ctx):
        a, b = _legacy_broadcast(inputs[0], inputs[1], attrs) if ctx.since < 7 else inputs
        return (fn(a, b),)

    return handler


for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}.items():
    op(_name, 1, 7)(_binary(_fn))


def _div(a, b):
    if _is_float(a) or _is_float(b):
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # C-style integer division, as onnxruntime


op("Div", 1, 7)(_binary(_div))


@op("Pow", 1, 7)
def _pow(inputs, attrs, ctx):
    x, y = _legacy_broadcast(inputs[0], inputs[1], attrs) if ctx.since < 7 else inputs
    return (torch.pow(x, y).to(x.dtype),)


@op("Mod", 10)
def _mod(inputs, attrs, ctx):
    a, b = inputs
    if attrs.get("fmod", 0):
        return (torch.fmod(a, b),)
    return (torch.remainder(a, b),)


def _unary(fn):
    def handler(inputs, attrs, ctx):
        return (fn(inputs[0]),)

    return handler


for _name, _fn in {
    "Sqrt": torch.sqrt,
    "Exp": torch.exp,
    "Log": torch.log,
    "Neg": torch.neg,
    "Abs": torch.abs,
    "Reciprocal": torch.reciprocal,
    "Relu": torch.relu,
    "Sigmoid": torch.sigmoid,
    "Tanh": torch.tanh,
    "Softplus": F.softplus,
    "Softsign": F.softsign,
    "Floor": torch.floor,
    "Ceil": torch.ceil,
    "Round": torch.round,  # round half to even, as ONNX
    "Sign": torch.sign,
    "Not": torch.logical_not,
    "Identity": lambda x: x,
    "Sin": torch.sin,
    "Cos": torch.cos,
    "Erf": torch.erf,
    "IsNaN": torch.isnan,
    "Mish": F.mish,
}.items():
    op(_name, 1)(_unary(_fn))


@op("IsInf", 10)
def _isinf(inputs, attrs, ctx):
    x = inputs[0]
    pos, neg = attrs.get("detect_positive", 1), attrs.get("detect_negative", 1)
    if pos and neg:
        return (torch.isinf(x),)
    if pos:
        return (torch.isposinf(x),)
    if neg:
        return (torch.isneginf(x),)
    return (torch.zeros_like(x, dtype=torch.bool),)


@op("LeakyRelu", 1)
def _leaky_relu(inputs, attrs, ctx):
    return (F.leaky_relu(inputs[0], attrs.get("alpha", 0.01)),)


@op("PRelu", 1)
def _prelu(inputs, attrs, ctx):
    x, slope = inputs
    return (torch.where(x < 0, x * slope, x),)


@op("Elu", 1)
def _elu(inputs, attrs, ctx):
    return (F.elu(inputs[0], attrs.get("alpha", 1.0)),)


@op("Celu", 12)
def _celu(inputs, attrs, ctx):
    return (F.celu(inputs[0], attrs.get("alpha", 1.0)),)


@op("Selu", 1)
def _selu(inputs, attrs, ctx):
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return (gamma * F.elu(inputs[0], alpha),)


@op("ThresholdedRelu", 10)
def _thresholded_relu(inputs, attrs, ctx):
    x = inputs[0]
    return (torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x)),)


@op("HardSigmoid", 1)
def _hard_sigmoid(inputs, attrs, ctx):
    return (torch.clamp(inputs[0] * attrs.get("alpha", 0.2) + attrs.get("beta", 0.5), 0.0, 1.0),)


@op("HardSwish", 14)
def _hard_swish(inputs, attrs, ctx):
    return (F.hardswish(inputs[0]),)


@op("Gelu", 20)
def _gelu(inputs, attrs, ctx):
    return (F.gelu(inputs[0], approximate=attrs.get("approximate", "none")),)


@op("Shrink", 9)
def _shrink(inputs, attrs, ctx):
    x = inputs[0]
    lambd, bias = attrs.get("lambd", 0.5), attrs.get("bias", 0.0)
    zero = torch.zeros_like(x)
    return (torch.where(x < -lambd, x + bias, torch.where(x > lambd, x - bias, zero)),)


def _unary_pair(fn):
    def handler(inputs, attrs, ctx):
        return (fn(inputs[0], inputs[1]),)

    return handler


for _name, _fn in {
    "Equal": torch.eq,
    "Less": torch.lt,
    "Greater": torch.gt,
    "And": torch.logical_and,
    "Or": torch.logical_or,
    "Xor": torch.logical_xor,
}.items():
    op(_name, 1)(_unary_pair(_fn))
op("LessOrEqual", 12)(_unary_pair(torch.le))
op("GreaterOrEqual", 12)(_unary_pair(torch.ge))


@op("Where", 9)
def _where(inputs, attrs, ctx):
    return (torch.where(inputs[0].to(torch.bool), inputs[1], inputs[2]),)


def _variadic(fn, mean=False):
    def handler(inputs, attrs, ctx):
        xs = [x for x in inputs if x is not None]
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        if mean:
            out = out / len(xs)
        return (out,)

    return handler


op("Max", 1)(_variadic(torch.maximum))
op("Min", 1)(_variadic(torch.minimum))
op("Sum", 1)(_variadic(torch.add))
op("Mean", 1)(_variadic(torch.add, mean=True))


@op("Clip", 1)
def _clip_attr(inputs, attrs, ctx):
    return (torch.clamp(inputs[0], attrs.get("min", -math.inf), attrs.get("max", math.inf)),)


@op("Clip", 11)
def _clip(inputs, attrs, ctx):
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and not _empty(inputs[1]) else None
    hi = inputs[2] if len(inputs) > 2 and not _empty(inputs[2]) else None
    if lo is None and hi is None:
        return (x,)
    return (torch.clamp(x, lo.reshape(()) if lo is not None else None, hi.reshape(()) if hi is not None else None),)


@op("Cast", 1)
def _cast(inputs, attrs, ctx):
    to = attrs["to"]
    if isinstance(to, str):  # opset 1 named the type
        to = TensorProto.DataType.Value(to.upper())
    return (inputs[0].to(_onnx_dtype(to)),)


# QDQ quantization (what onnxruntime.quantization's QDQ format and TensorRT's explicit
# quantization emit). QuantizeLinear's integer output is carried as a float tensor holding the
# integer values, with a straight-through gradient (zero where the value saturates beyond the
# range, as torch's fake_quantize); DequantizeLinear turns it back. Forward values equal onnxruntime's.
_QRANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.uint16: (0, 65535), torch.int16: (-32768, 32767)}


def _check_qdq(attrs, ctx):
    if attrs.get("block_size", 0):
        return "blocked quantization (block_size)"
    out = attrs.get("output_dtype", 0)
    if out and _DTYPES.get(out) not in _QRANGE:
        return f"output_dtype {TensorProto.DataType.Name(out)}"
    return None


def _per_axis(t: torch.Tensor, x: torch.Tensor, axis: int) -> torch.Tensor:
    """A scale or zero point, scalar or 1-D along ``axis``, shaped to broadcast against ``x``."""
    t = t.to(torch.float32)
    if t.numel() == 1:
        return t.reshape(())
    shape = [1] * x.dim()
    shape[_norm_axis(axis, x.dim())] = -1
    return t.reshape(shape)


@op("QuantizeLinear", 10, 13, 19, 21, check=_check_qdq)
def _quantize_linear(inputs, attrs, ctx):
    x, scale = inputs[0].to(torch.float32), inputs[1]
    zp = inputs[2] if len(inputs) > 2 and not _empty(inputs[2]) else None
    qtype = zp.dtype if zp is not None else (_onnx_dtype(attrs["output_dtype"]) if attrs.get("output_dtype")
                                              else torch.uint8)
    if qtype not in _QRANGE:
        raise CloakError(f"QuantizeLinear to {qtype} is not supported by the torch executor")
    lo, hi = _QRANGE[qtype]
    axis = attrs.get("axis", 1)
    v = x / _per_axis(scale, x, axis)
    if zp is not None:
        v = v + _per_axis(zp, x, axis)
    # Straight through where lo <= v <= hi, boundaries included: torch.clamp's own gradient is zero
    # at the boundary, which froze every input pixel at the bottom of the box (digits' background
    # is exactly 0) and made gradient attacks through QDQ graphs much weaker than transfer.
    inside = ((v >= lo) & (v <= hi)).to(v.dtype).detach()
    return (v * inside + (torch.round(v).clamp(lo, hi) - v * inside).detach(),)


@op("DequantizeLinear", 10, 13, 19, 21, check=_check_qdq)
def _dequantize_linear(inputs, attrs, ctx):
    x, scale = inputs[0], inputs[1]
    zp = inputs[2] if len(inputs) > 2 and not _empty(inputs[2]) else None
    axis = attrs.get("axis", 1)
    y = x.to(torch.float32)
    if zp is not None:
        y = y - _per_axis(zp, y, axis)
    return (y * _per_axis(scale, y, axis),)


@op("CastLike", 15)
def _cast_like(inputs, attrs, ctx):
    return (inputs[0].to(inputs[1].dtype),)


@op("Dropout", 1)
def _dropout(inputs, attrs, ctx):
    x = inputs[0]
    if ctx.wants(1):
        return (x, torch.ones_like(x, dtype=torch.bool if ctx.opset >= 10 else x.dtype))
    return (x,)


# --------------------------------------------------------------------------------------------
# Linear algebra, convolution, normalisation
# --------------------------------------------------------------------------------------------


@op("MatMul", 1)
def _matmul(inputs, attrs, ctx):
    return (torch.matmul(inputs[0], inputs[1]),)


@op("Gemm", 1)
def _gemm(inputs, attrs, ctx):
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    alpha, beta = attrs.get("alpha", 1.0), attrs.get("beta", 1.0)
    if attrs.get("transA", 0):
        a = a.t()
    if alpha == 1.0 and attrs.get("transB", 0) and (c is None or (beta == 1.0 and c.dim() == 1 and c.shape[0] == b.shape[0])):
        return (F.linear(a, b, c),)  # the common nn.Linear export: same kernel as torch
    y = torch.matmul(a, b.t() if attrs.get("transB", 0) else b)
    if alpha != 1.0:
        y = y * alpha
    if c is not None:
        y = y + (c * beta if beta != 1.0 else c)
    return (y,)


@op("Einsum", 12)
def _einsum(inputs, attrs, ctx):
    return (torch.einsum(attrs["equation"].replace(" ", ""), *inputs),)


def _auto_pads(auto_pad: str, sizes, kernel, strides, dilations):
    """SAME_UPPER/SAME_LOWER/VALID -> explicit (begins, ends), as onnxruntime computes them."""
    begins, ends = [], []
    for n, k, s, d in zip(sizes, kernel, strides, dilations):
        if auto_pad == "VALID":
            begins.append(0)
            ends.append(0)
            continue
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else large)
        ends.append(large if auto_pad == "SAME_UPPER" else small)
    return begins, ends


def _spatial_pads(x, attrs, kernel, strides, dilations):
    n = len(kernel)
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", ""):
        return _auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations)
    pads = attrs.get("pads", [0] * (2 * n))
    return pads[:n], pads[n:]


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_conv(attrs, ctx):
    k = attrs.get("kernel_shape")
    if k is not None and len(k) not in _CONV:
        return f"{len(k)}-d convolution"
    return None


@op("Conv", 1, check=_check_conv)
def _conv(inputs, attrs, ctx):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    kernel = attrs.get("kernel_shape") or list(w.shape[2:])
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    begins, ends = _spatial_pads(x, attrs, kernel, strides, dilations)
    if begins != ends:
        x = F.pad(x, _pt_pad(begins, ends))
        begins = [0] * n
    return (_CONV[n](x, w, b, strides, begins, dilations, attrs.get("group", 1)),)


@op("ConvTranspose", 1, check=_check_conv)
def _conv_transpose(inputs, attrs, ctx):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    n = w.dim() - 2
    group = attrs.get("group", 1)
    kernel = attrs.get("kernel_shape") or list(w.shape[2:])
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    out_pad = attrs.get("output_padding", [0] * n)
    sizes = list(x.shape[2:])
    full = [s * (i - 1) + (k - 1) * d + 1 for i, s, k, d in zip(sizes, strides, kernel, dilations)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = attrs["output_shape"][-n:] if "output_shape" in attrs else [i * s for i, s in zip(sizes, strides)]
        begins, ends = [], []
        for f, op_, t in zip(full, out_pad, target):
            total = f + op_ - t
            small, large = total // 2, total - total // 2
            # as onnxruntime: the odd pixel is cropped at the end for SAME_UPPER, else at the start
            upper = auto_pad == "SAME_UPPER"
            begins.append(small if upper else large)
            ends.append(large if upper else small)
    elif auto_pad == "VALID":
        begins, ends = [0] * n, [0] * n
    else:
        pads = attrs.get("pads", [0] * (2 * n))
        begins, ends = pads[:n], pads[n:]
    if begins == ends and all(p < max(s, d) for p, s, d in zip(out_pad, strides, dilations)):
        return (_CONV_T[n](x, w, b, strides, begins, out_pad, group, dilations),)
    # General case: full transposed conv, then crop/extend each axis, then the bias.
    y = _CONV_T[n](x, w, None, strides, 0, 0, group, dilations)
    y = F.pad(y, _pt_pad([-p for p in begins], [op_ - p for op_, p in zip(out_pad, ends)]))
    if b is not None:
        y = y + b.reshape((1, -1) + (1,) * n)
    return (y,)


def _check_bn(attrs, ctx):
    if attrs.get("training_mode", 0):
        return "training_mode=1 (only inference is supported)"
    return None


@op("BatchNormalization", 1, check=_check_bn)
def _batch_norm(inputs, attrs, ctx):
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    if ctx.since < 9 and attrs.get("spatial", 1) == 0:  # per-activation statistics
        shape = (1,) + tuple(scale.shape)
        y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
    else:
        y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    return (y, mean, var) if ctx.n_outputs > 1 else (y,)  # inference: statistics pass through


@op("InstanceNormalization", 1)
def _instance_norm(inputs, attrs, ctx):
    x, scale, bias = inputs
    return (F.instance_norm(x, weight=scale, bias=bias, eps=attrs.get("epsilon", 1e-5)),)


@op("LayerNormalization", 17)
def _layer_norm(inputs, attrs, ctx):
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    eps = attrs.get("epsilon", 1e-5)
    axis = _norm_axis(attrs.get("axis", -1), x.dim())
    norm_shape = tuple(x.shape[axis:])
    if not ctx.wants(1) and not ctx.wants(2):
        if tuple(scale.shape) == norm_shape and (bias is None or tuple(bias.shape) == norm_shape):
            return (F.layer_norm(x, norm_shape, scale, bias, eps),)
        y = F.layer_norm(x, norm_shape, None, None, eps) * scale
        return (y + bias if bias is not None else y,)
    dims = tuple(range(axis, x.dim()))
    mean = x.mean(dims, keepdim=True)
    inv_std = torch.rsqrt(((x - mean) ** 2).mean(dims, keepdim=True) + eps)
    y = (x - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return (y, mean, inv_std)


@op("GroupNormalization", 18)
def _group_norm(inputs, attrs, ctx):
    x, scale, bias = inputs
    groups = attrs["num_groups"]
    channels = x.shape[1]
    if ctx.since < 21 and scale.numel() == groups and groups != channels:  # v18: per-group affine
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return (F.group_norm(x, groups, scale, bias, attrs.get("epsilon", 1e-5)),)


@op("LpNormalization", 1)
def _lp_norm(inputs, attrs, ctx):
    x = inputs[0]
    p = attrs.get("p", 2)
    norm = torch.linalg.vector_norm(x, p, dim=attrs.get("axis", -1), keepdim=True)
    return (x / norm,)


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------

_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_geometry(x, attrs):
    kernel = attrs["kernel_shape"]
    n = len(kernel)
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    begins, ends = _spatial_pads(x, attrs, kernel, strides, dilations)
    return kernel, strides, dilations, list(begins), list(ends)


def _check_pool(attrs, ctx):
    if len(attrs.get("kernel_shape", [])) not in _MAXPOOL:
        return "only 1-d, 2-d and 3-d pooling"
    return None


def _check_avgpool(attrs, ctx):
    if any(d != 1 for d in attrs.get("dilations", [])):
        return "AveragePool with dilations"
    return _check_pool(attrs, ctx)


@op("MaxPool", 1, check=_check_pool)
def _max_pool(inputs, attrs, ctx):
    x = inputs[0]
    kernel, strides, dilations, begins, ends = _pool_geometry(x, attrs)
    n = len(kernel)
    ceil = bool(attrs.get("ceil_mode", 0))
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    xin = x
    if begins != ends or any(2 * p > e for p, e in zip(begins, eff)):
        xin = F.pad(x, _pt_pad(begins, ends), value=-math.inf if _is_float(x) else torch.iinfo(x.dtype).min)
        padding = [0] * n
    else:
        padding = begins
    if not ctx.wants(1):
        return (_MAXPOOL[n](xin, kernel, strides, padding, dilations, ceil),)
    y, idx = _MAXPOOL[n](xin, kernel, strides, padding, dilations, ceil, return_indices=True)
    # torch indexes each (n, c) plane of the tensor it pooled; ONNX indexes the whole input tensor.
    pooled = list(xin.shape[2:])
    orig = list(x.shape[2:])
    coords, rem = [], idx
    for size in reversed(pooled):
        coords.append(rem % size)
        rem = rem // size
    coords = coords[::-1]
    if padding == [0] * n:
        coords = [c - b for c, b in zip(coords, begins)]
    order = range(n) if not attrs.get("storage_order", 0) else reversed(range(n))
    flat = torch.zeros_like(idx)
    for i in order:
        flat = flat * orig[i] + coords[i]
    plane = int(np.prod(orig))
    nc = torch.arange(x.shape[0] * x.shape[1], device=x.device).reshape(x.shape[0], x.shape[1], *([1] * n))
    return (y, flat + nc * plane)


@op("AveragePool", 1, check=_check_avgpool)
def _avg_pool(inputs, attrs, ctx):
    x = inputs[0]
    kernel, strides, _dil, begins, ends = _pool_geometry(x, attrs)
    n = len(kernel)
    ceil = bool(attrs.get("ceil_mode", 0))
    include = bool(attrs.get("count_include_pad", 0))
    pool = _AVGPOOL[n]
    if begins == ends and all(2 * p <= k for p, k in zip(begins, kernel)):
        return (pool(x, kernel, strides, begins, ceil, include),)
    padded = F.pad(x, _pt_pad(begins, ends))
    if include:
        return (pool(padded, kernel, strides, 0, ceil, True),)
    # Exclude the padding from each window's count: average of x over average of a 0/1 mask.
    ones = F.pad(torch.ones((1, 1) + tuple(x.shape[2:]), dtype=x.dtype, device=x.device), _pt_pad(begins, ends))
    return (pool(padded, kernel, strides, 0, ceil, True) / pool(ones, kernel, strides, 0, ceil, True),)


@op("GlobalAveragePool", 1)
def _global_avg_pool(inputs, attrs, ctx):
    x = inputs[0]
    if x.dim() == 4:
        return (F.adaptive_avg_pool2d(x, 1),)
    return (x.mean(tuple(range(2, x.dim())), keepdim=True),)


@op("GlobalMaxPool", 1)
def _global_max_pool(inputs, attrs, ctx):
    x = inputs[0]
    return (x.amax(tuple(range(2, x.dim())), keepdim=True),)


# --------------------------------------------------------------------------------------------
# Softmax family
# --------------------------------------------------------------------------------------------


def _softmax_like(fn):
    def legacy(inputs, attrs, ctx):
        """Opset < 13: coerce to 2-D at ``axis`` (default 1), normalise rows, restore shape."""
        x = inputs[0]
        axis = _norm_axis(attrs.get("axis", 1), x.dim())
        if axis == x.dim() - 1:
            return (fn(x, -1),)
        shape = x.shape
        rows = int(np.prod(shape[:axis])) if axis else 1
        return (fn(x.reshape(rows, -1), 1).reshape(shape),)

    def modern(inputs, attrs, ctx):
        return (fn(inputs[0], attrs.get("axis", -1)),)

    return legacy, modern


def _hardmax(x, dim):
    return F.one_hot(x.argmax(dim), x.shape[dim]).movedim(-1, dim).to(x.dtype)


for _name, _fn in {"Softmax": F.softmax, "LogSoftmax": F.log_softmax, "Hardmax": _hardmax}.items():
    _legacy, _modern = _softmax_like(_fn)
    op(_name, 1)(_legacy)
    op(_name, 13)(_modern)


# --------------------------------------------------------------------------------------------
# Reductions: axes is an attribute up to some opset and an input after it
# --------------------------------------------------------------------------------------------


def _reduce_mean(x, dims, keep):
    if _is_float(x):
        return x.mean(dims, keepdim=keep)
    count = int(np.prod([x.shape[d] for d in dims])) if dims else x.numel()
    return torch.div(x.sum(dims, keepdim=keep), count, rounding_mode="trunc").to(x.dtype)


def _reduce_prod(x, dims, keep):
    for d in sorted(dims, reverse=True):
        x = torch.prod(x, d, keepdim=keep)
    return x


_REDUCERS = {
    "ReduceMean": _reduce_mean,
    "ReduceSum": lambda x, d, k: x.sum(d, keepdim=k),
    "ReduceMax": lambda x, d, k: x.amax(d, keepdim=k),
    "ReduceMin": lambda x, d, k: x.amin(d, keepdim=k),
    "ReduceL2": lambda x, d, k: torch.linalg.vector_norm(x, 2, d, keepdim=k),
    "ReduceL1": lambda x, d, k: x.abs().sum(d, keepdim=k),
    "ReduceSumSquare": lambda x, d, k: (x * x).sum(d, keepdim=k),
    "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, d, keepdim=k),
    "ReduceLogSum": lambda x, d, k: torch.log(x.sum(d, keepdim=k)),
    "ReduceProd": _reduce_prod,
}
_AXES_BECAME_INPUT = {"ReduceSum": 13}  # the others moved axes to an input in opset 18
# With empty axes and noop_with_empty_axes=1 the elementwise part still applies (as onnxruntime
# and the ONNX reference implementation do): ReduceL2 gives |x|, ReduceSumSquare x*x, ...
_NOOP = {"ReduceL1": torch.abs, "ReduceL2": torch.abs, "ReduceSumSquare": lambda x: x * x, "ReduceLogSum": torch.log}


def _reduce(kind: str, x, axes, keep: bool, noop: bool):
    if not axes:
        if noop:
            return _NOOP.get(kind, lambda t: t)(x)
        dims = tuple(range(x.dim()))
    else:
        dims = tuple(_norm_axes(axes, x.dim()))
    if x.dim() == 0:
        return _REDUCERS[kind](x.reshape(1), (0,), False).reshape(())
    if not dims:
        return x
    return _REDUCERS[kind](x, dims, keep)


def _reduce_handlers(kind):
    def attr_form(inputs, attrs, ctx):
        return (_reduce(kind, inputs[0], attrs.get("axes"), bool(attrs.get("keepdims", 1)), False),)

    def input_form(inputs, attrs, ctx):
        axes = _ints(inputs[1]) if len(inputs) > 1 else None
        noop = bool(attrs.get("noop_with_empty_axes", 0))
        return (_reduce(kind, inputs[0], axes, bool(attrs.get("keepdims", 1)), noop),)

    return attr_form, input_form


for _name in _REDUCERS:
    _attr_form, _input_form = _reduce_handlers(_name)
    op(_name, 1)(_attr_form)
    op(_name, _AXES_BECAME_INPUT.get(_name, 18))(_input_form)


def _arg(fn):
    def handler(inputs, attrs, ctx):
        x = inputs[0]
        axis = _norm_axis(attrs.get("axis", 0), x.dim())
        keep = bool(attrs.get("keepdims", 1))
        if attrs.get("select_last_index", 0):
            idx = fn(x.flip(axis), axis, keepdim=keep)
            return (x.shape[axis] - 1 - idx,)
        return (fn(x, axis, keepdim=keep),)

    return handler


op("ArgMax", 1)(_arg(torch.argmax))
op("ArgMin", 1)(_arg(torch.argmin))


@op("TopK", 10)
def _topk(inputs, attrs, ctx):
    x, k = inputs[0], int(_scalar(inputs[1]))
    axis = _norm_axis(attrs.get("axis", -1), x.dim())
    values, idx = torch.topk(x, k, axis, largest=bool(attrs.get("largest", 1)), sorted=True)
    return (values, idx)


@op("TopK", 1)
def _topk_attr(inputs, attrs, ctx):
    return _topk([inputs[0], attrs["k"]], attrs, ctx)


@op("CumSum", 11)
def _cumsum(inputs, attrs, ctx):
    x = inputs[0]
    axis = _norm_axis(int(_scalar(inputs[1])), x.dim())
    reverse, exclusive = attrs.get("reverse", 0), attrs.get("exclusive", 0)
    if reverse:
        x = x.flip(axis)
    y = torch.cumsum(x, axis)
    if exclusive:
        y = y - x
    if reverse:
        y = y.flip(axis)
    return (y,)


# --------------------------------------------------------------------------------------------
# Shapes and indexing
# --------------------------------------------------------------------------------------------


@op("Shape", 1)
def _shape(inputs, attrs, ctx):
    shape = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return (torch.tensor(shape[slice(start, end)], dtype=torch.int64, device=inputs[0].device),)


@op("Size", 1)
def _size(inputs, attrs, ctx):
    return (torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device),)


@op("Flatten", 1)
def _flatten(inputs, attrs, ctx):
    x = inputs[0]
    axis = _norm_axis(attrs.get("axis", 1), x.dim())
    rows = int(np.prod(x.shape[:axis])) if axis else 1
    cols = int(np.prod(x.shape[axis:])) if axis < x.dim() else 1
    return (x.reshape(rows, cols),)


def _reshape(x, shape: list[int], allowzero: bool):
    if not allowzero:
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
    return x.reshape(shape)


@op("Reshape", 1)
def _reshape_attr(inputs, attrs, ctx):
    return (_reshape(inputs[0], attrs["shape"], False),)


@op("Reshape", 5)
def _reshape_input(inputs, attrs, ctx):
    return (_reshape(inputs[0], _ints(inputs[1]), bool(attrs.get("allowzero", 0))),)


@op("Transpose", 1)
def _transpose(inputs, attrs, ctx):
    x = inputs[0]
    perm = attrs.get("perm") or list(range(x.dim() - 1, -1, -1))
    return (x.permute(perm),)


@op("Concat", 1)
def _concat(inputs, attrs, ctx):
    xs = [x for x in inputs if x is not None]
    return (torch.cat(xs, attrs.get("axis", 1)),)


def _split(x, axis: int, sizes: list[int] | None, n_out: int, num_outputs: int | None = None):
    axis = _norm_axis(axis, x.dim())
    dim = x.shape[axis]
    if sizes is None:
        parts = num_outputs or n_out
        chunk = -(-dim // parts)
        sizes = [min(chunk, max(0, dim - i * chunk)) for i in range(parts)]
    return tuple(torch.split(x, list(sizes), axis))


@op("Split", 1)
def _split_v1(inputs, attrs, ctx):
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    return _split(inputs[0], attrs.get("axis", 0), sizes, ctx.n_outputs)


@op("Split", 2)
def _split_attr(inputs, attrs, ctx):
    return _split(inputs[0], attrs.get("axis", 0), attrs.get("split") or None, ctx.n_outputs)


@op("Split", 13)
def _split_input(inputs, attrs, ctx):
    sizes = _ints(inputs[1]) if len(inputs) > 1 and not _empty(inputs[1]) else None
    return _split(inputs[0], attrs.get("axis", 0), sizes, ctx.n_outputs, attrs.get("num_outputs"))


def _slice(x, starts, ends, axes, steps):
    rank = x.dim()
    axes = _norm_axes(axes, rank) if axes is not None else list(range(len(starts)))
    steps = steps or [1] * len(starts)
    index = [slice(None)] * rank
    flips = []
    for a, s, e, st in zip(axes, starts, ends, steps):
        size = x.shape[a]
        # ONNX clamps like numpy; Python's slice.indices does exactly that, INT64 extremes included.
        start, stop, step = slice(s, e, st).indices(size)
        if step > 0:
            index[a] = slice(start, max(start, stop), step)
        else:  # torch has no negative steps: slice the flipped axis instead
            count = len(range(start, stop, step))
            first = size - 1 - start
            index[a] = slice(first, first + (count - 1) * -step + 1 if count else first, -step)
            flips.append(a)
    if flips:
        x = x.flip(flips)
    return x[tuple(index)]


@op("Slice", 1)
def _slice_attr(inputs, attrs, ctx):
    return (_slice(inputs[0], attrs["starts"], attrs["ends"], attrs.get("axes"), None),)


@op("Slice", 10)
def _slice_input(inputs, attrs, ctx):
    x = inputs[0]
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    return (_slice(x, _ints(inputs[1]), _ints(inputs[2]), axes, steps),)


def _fix_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + size, idx)


@op("Gather", 1)
def _gather(inputs, attrs, ctx):
    x, idx = inputs
    axis = _norm_axis(attrs.get("axis", 0), x.dim())
    idx = _fix_index(idx, x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return (out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :])),)


@op("GatherElements", 11)
def _gather_elements(inputs, attrs, ctx):
    x, idx = inputs
    axis = _norm_axis(attrs.get("axis", 0), x.dim())
    return (torch.gather(x, axis, _fix_index(idx, x.shape[axis])),)


def _nd_index(data, idx, batch_dims: int):
    """The advanced-indexing tuple that GatherND/ScatterND address with ``idx[..., :K]``."""
    k = idx.shape[-1]
    idx = idx.to(torch.int64)
    sizes = torch.tensor(data.shape[batch_dims : batch_dims + k], device=idx.device)
    idx = torch.where(idx < 0, idx + sizes, idx)
    parts = []
    for b in range(batch_dims):
        shape = [1] * (idx.dim() - 1)
        shape[b] = data.shape[b]
        parts.append(torch.arange(data.shape[b], device=idx.device).reshape(shape))
    parts += [idx[..., i] for i in range(k)]
    return tuple(parts)


@op("GatherND", 11)
def _gather_nd(inputs, attrs, ctx):
    data, idx = inputs
    return (data[_nd_index(data, idx, attrs.get("batch_dims", 0))],)


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@op("ScatterND", 11)
def _scatter_nd(inputs, attrs, ctx):
    data, idx, updates = inputs
    reduction = attrs.get("reduction", "none")
    index = _nd_index(data, idx, 0)
    if reduction in ("none", "add"):
        return (torch.index_put(data, index, updates, accumulate=reduction == "add"),)
    # mul/max/min: flatten the addressed leading axes and reduce along them
    k = idx.shape[-1]
    lead = data.shape[:k]
    strides = [int(np.prod(lead[i + 1 :])) for i in range(k)]
    flat = sum(i * s for i, s in zip(index, strides)).reshape(-1)
    src = updates.reshape((-1,) + tuple(data.shape[k:]))
    index = flat.reshape((-1,) + (1,) * (src.dim() - 1)).expand_as(src)
    out = data.reshape((-1,) + tuple(data.shape[k:])).scatter_reduce(0, index, src, _SCATTER_REDUCE[reduction])
    return (out.reshape(data.shape),)


@op("ScatterElements", 11)
def _scatter_elements(inputs, attrs, ctx):
    data, idx, updates = inputs
    axis = _norm_axis(attrs.get("axis", 0), data.dim())
    idx = _fix_index(idx, data.shape[axis])
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        return (torch.scatter(data, axis, idx, updates),)
    mode = {"add": "sum", **_SCATTER_REDUCE}[reduction]
    return (torch.scatter_reduce(data, axis, idx, updates, mode, include_self=True),)


def _squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_norm_axes(axes, x.dim()))) if axes else x


@op("Squeeze", 1)
def _squeeze_attr(inputs, attrs, ctx):
    return (_squeeze(inputs[0], attrs.get("axes")),)


@op("Squeeze", 13)
def _squeeze_input(inputs, attrs, ctx):
    return (_squeeze(inputs[0], _ints(inputs[1]) if len(inputs) > 1 else None),)


def _unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for a in sorted(_norm_axes(axes, rank)):
        x = x.unsqueeze(a)
    return x


@op("Unsqueeze", 1)
def _unsqueeze_attr(inputs, attrs, ctx):
    return (_unsqueeze(inputs[0], attrs["axes"]),)


@op("Unsqueeze", 13)
def _unsqueeze_input(inputs, attrs, ctx):
    return (_unsqueeze(inputs[0], _ints(inputs[1])),)


@op("Expand", 8)
def _expand(inputs, attrs, ctx):
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return (x.expand(shape),)


@op("Tile", 6)
def _tile(inputs, attrs, ctx):
    return (inputs[0].repeat(_ints(inputs[1])),)


@op("ConstantOfShape", 9)
def _constant_of_shape(inputs, attrs, ctx):
    value = attrs.get("value")
    shape = _ints(inputs[0])
    device = inputs[0].device
    if value is None:
        return (torch.zeros(shape, dtype=torch.float32, device=device),)
    return (torch.full(shape, value.reshape(-1)[0].item(), dtype=value.dtype, device=device),)


@op("Range", 11)
def _range(inputs, attrs, ctx):
    start, limit, delta = inputs
    return (torch.arange(_scalar(start), _scalar(limit), _scalar(delta), dtype=start.dtype, device=start.device),)


@op("Trilu", 14)
def _trilu(inputs, attrs, ctx):
    x = inputs[0]
    k = int(_scalar(inputs[1])) if len(inputs) > 1 and inputs[1] is not None else 0
    return (torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k),)


@op("OneHot", 9)
def _one_hot(inputs, attrs, ctx):
    idx, depth, values = inputs
    depth = int(_scalar(depth))
    idx = idx.to(torch.int64)
    idx = torch.where(idx < 0, idx + depth, idx)
    valid = (idx >= 0) & (idx < depth)
    hot = F.one_hot(torch.where(valid, idx, 0), depth) * valid.unsqueeze(-1)
    axis = _norm_axis(attrs.get("axis", -1), idx.dim() + 1)
    hot = hot.movedim(-1, axis)
    values = values.reshape(-1)
    return (torch.where(hot.bool(), values[1], values[0]),)


@op("NonZero", 9)
def _nonzero(inputs, attrs, ctx):
    return (torch.nonzero(inputs[0]).t().contiguous(),)


@op("DepthToSpace", 1)
def _depth_to_space(inputs, attrs, ctx):
    x = inputs[0]
    b = attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "CRD":
        return (F.pixel_shuffle(x, b),)
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return (y.reshape(n, c // (b * b), h * b, w * b),)


@op("SpaceToDepth", 1)
def _space_to_depth(inputs, attrs, ctx):
    x = inputs[0]
    b = attrs["blocksize"]
    n, c, h, w = x.shape
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return (y.reshape(n, c * b * b, h // b, w // b),)


# --------------------------------------------------------------------------------------------
# Pad
# --------------------------------------------------------------------------------------------

_PAD_MODES = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _check_pad(attrs, ctx):
    mode = attrs.get("mode", "constant")
    if mode != "constant" and mode not in _PAD_MODES:
        return f"Pad mode {mode!r}"
    return None


def _pad(x, pads: list[int], mode: str, value, axes=None):
    rank = x.dim()
    axes = _norm_axes(axes, rank) if axes is not None else list(range(rank))
    n = len(axes)
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[n + i]
    if mode == "constant":
        first = next((a for a in range(rank) if begins[a] or ends[a]), rank)
        if first == rank:
            return x
        return F.pad(x, _pt_pad(begins[first:], ends[first:]), value=float(value) if _is_float(x) else int(value))
    # reflect/edge/wrap: crop negative pads, then pad one axis at a time through a 3-d view,
    # since torch only pads the last 1-3 axes in these modes.
    if any(p < 0 for p in begins + ends):
        x = x[tuple(slice(-min(b, 0), x.shape[a] + min(e, 0)) for a, (b, e) in enumerate(zip(begins, ends)))]
    for a in range(rank):
        b, e = max(begins[a], 0), max(ends[a], 0)
        if not (b or e):
            continue
        moved = x.movedim(a, -1)
        shape = moved.shape
        flat = moved.reshape(-1, 1, shape[-1])
        if not _is_float(flat):
            padded = F.pad(flat.double(), (b, e), mode=_PAD_MODES[mode]).to(flat.dtype)
        else:
            padded = F.pad(flat, (b, e), mode=_PAD_MODES[mode])
        x = padded.reshape(tuple(shape[:-1]) + (padded.shape[-1],)).movedim(-1, a)
    return x


@op("Pad", 1, check=_check_pad)
def _pad_v1(inputs, attrs, ctx):
    pads = attrs.get("pads", attrs.get("paddings"))
    return (_pad(inputs[0], pads, attrs.get("mode", "constant"), attrs.get("value", 0.0)),)


@op("Pad", 11, check=_check_pad)
def _pad_v11(inputs, attrs, ctx):
    x = inputs[0]
    value = _scalar(inputs[2]) if len(inputs) > 2 and not _empty(inputs[2]) else 0
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    return (_pad(x, _ints(inputs[1]), attrs.get("mode", "constant"), value, axes),)


# --------------------------------------------------------------------------------------------
# Resize / Upsample: one separable pass per resized axis, sampling exactly as the spec says
# --------------------------------------------------------------------------------------------


def _check_resize(attrs, ctx):
    mode = attrs.get("mode", "nearest")
    if mode not in ("nearest", "linear", "cubic", "bilinear", "trilinear"):
        return f"Resize mode {mode!r}"
    ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
    if ctm not in _COORD_MODES:
        return f"coordinate_transformation_mode {ctm!r}"
    return None


def _coords(ctm, out_len, in_len, scale, roi_start, roi_end):
    x = torch.arange(out_len, dtype=torch.float32)
    if ctm == "half_pixel":
        return (x + 0.5) / scale - 0.5
    if ctm == "half_pixel_symmetric":
        adjustment = out_len / (scale * in_len)
        offset = in_len / 2 * (1 - adjustment)
        return offset + (x + 0.5) / scale - 0.5
    if ctm == "pytorch_half_pixel":
        return (x + 0.5) / scale - 0.5 if out_len > 1 else torch.zeros_like(x)
    if ctm == "align_corners":
        return x * ((in_len - 1) / (out_len - 1)) if out_len > 1 else torch.zeros_like(x)
    if ctm == "asymmetric":
        return x / scale
    if ctm == "tf_half_pixel_for_nn":
        return (x + 0.5) / scale
    if ctm == "tf_crop_and_resize":
        if out_len > 1:
            return roi_start * (in_len - 1) + x * ((roi_end - roi_start) * (in_len - 1) / (out_len - 1))
        return torch.full_like(x, 0.5 * (roi_start + roi_end) * (in_len - 1))
    raise CloakError(f"unknown coordinate_transformation_mode {ctm!r}")


_COORD_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
    "tf_crop_and_resize",
)

_NEAREST = {
    "round_prefer_floor": lambda c: torch.ceil(c - 0.5),
    "round_prefer_ceil": lambda c: torch.floor(c + 0.5),
    "floor": torch.floor,
    "ceil": torch.ceil,
}


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    """Keys cubic weights of the four taps at distances 1+t, t, 1-t, 2-t."""

    def near(d):
        return ((a + 2) * d - (a + 3)) * d * d + 1

    def far(d):
        return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a

    return [far(1 + t), near(t), near(1 - t), far(2 - t)]


def _axis_sampler(mode, attrs, ctm, in_len, out_len, scale, roi_start, roi_end):
    """Per-axis (indices, weights, outside-mask) for a resize; computed once per shape."""
    c = _coords(ctm, out_len, in_len, scale, roi_start, roi_end)
    outside = None
    if ctm == "tf_crop_and_resize":
        outside = (c < 0) | (c > in_len - 1)
    if mode == "nearest":
        idx = _NEAREST[attrs.get("nearest_mode", "round_prefer_floor")](c)
        return [idx.clamp(0, in_len - 1).long()], None, outside
    if mode == "linear":
        c = c.clamp(0, in_len - 1)
        i0 = c.floor()
        w1 = c - i0
        i0 = i0.long()
        i1 = (i0 + 1).clamp(max=in_len - 1)
        return [i0, i1], [1 - w1, w1], outside
    # cubic
    i0 = c.floor()
    t = c - i0
    i0 = i0.long()
    taps = [i0 - 1, i0, i0 + 1, i0 + 2]
    weights = _cubic_weights(t, attrs.get("cubic_coeff_a", -0.75))
    if attrs.get("exclude_outside", 0):
        weights = [w * ((i >= 0) & (i < in_len)) for w, i in zip(weights, taps)]
        total = sum(weights)
        weights = [w / total for w in weights]
    return [i.clamp(0, in_len - 1) for i in taps], weights, outside


def _resize(x, scales, sizes, roi, attrs, ctx, opset10=False):
    mode = {"bilinear": "linear", "trilinear": "linear"}.get(attrs.get("mode", "nearest"), attrs.get("mode", "nearest"))
    ctm = "asymmetric" if opset10 else attrs.get("coordinate_transformation_mode", "half_pixel")
    rank = x.dim()
    axes = _norm_axes(attrs["axes"], rank) if attrs.get("axes") else list(range(rank))
    in_sizes = [x.shape[a] for a in axes]
    if sizes is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            outs = list(sizes)
            scales = [o / i for o, i in zip(outs, in_sizes)]
        else:
            ratios = [o / i for o, i in zip(sizes, in_sizes)]
            s = min(ratios) if policy == "not_larger" else max(ratios)
            outs = [int(math.floor(s * i + 0.5)) for i in in_sizes]
            scales = [s] * len(axes)
    else:
        # The spec scales by the roi span for tf_crop_and_resize; onnxruntime does not (followed here).
        outs = [int(math.floor(i * s)) for i, s in zip(in_sizes, scales)]
    if mode != "nearest" and attrs.get("antialias", 0) and any(o < i for o, i in zip(outs, in_sizes)):
        raise CloakError(f"Resize node {ctx.name!r}: antialiased downscaling is not supported by the torch executor")
    extrapolation = attrs.get("extrapolation_value", 0.0)
    for k, (a, n_in, n_out, s) in enumerate(zip(axes, in_sizes, outs, scales)):
        if n_in == n_out and s == 1.0 and ctm != "tf_crop_and_resize":
            continue
        rs, re = (roi[k], roi[len(axes) + k]) if roi is not None and ctm == "tf_crop_and_resize" else (0.0, 1.0)
        key = (mode, a, n_in, n_out, s, rs, re, x.device)
        if key not in ctx.cache:
            idx, w, outside = _axis_sampler(mode, attrs, ctm, n_in, n_out, s, rs, re)
            shape = [1] * rank
            shape[a] = n_out
            ctx.cache[key] = (
                [i.to(x.device) for i in idx],
                None if w is None else [wi.reshape(shape).to(x.device) for wi in w],
                None if outside is None else outside.reshape(shape).to(x.device),
            )
        idx, w, outside = ctx.cache[key]
        if w is None:
            y = x.index_select(a, idx[0])
        else:
            y = sum(x.index_select(a, i) * wi.to(x.dtype) for i, wi in zip(idx, w))
        if outside is not None:
            y = torch.where(outside, torch.full_like(y, extrapolation), y)
        x = y
    return x


@op("Resize", 10, check=_check_resize)
def _resize_v10(inputs, attrs, ctx):
    return (_resize(inputs[0], _floats(inputs[1]), None, None, attrs, ctx, opset10=True),)


@op("Resize", 11, check=_check_resize)
def _resize_v11(inputs, attrs, ctx):
    x = inputs[0]
    roi = _floats(inputs[1]) if len(inputs) > 1 and not _empty(inputs[1]) else None
    scales = _floats(inputs[2]) if len(inputs) > 2 and not _empty(inputs[2]) else None
    sizes = _ints(inputs[3]) if len(inputs) > 3 and not _empty(inputs[3]) else None
    return (_resize(x, scales, sizes, roi, attrs, ctx),)


@op("Upsample", 7, check=_check_resize)
def _upsample_attr(inputs, attrs, ctx):
    return (_resize(inputs[0], attrs["scales"], None, None, attrs, ctx, opset10=True),)


@op("Upsample", 9, check=_check_resize)
def _upsample_input(inputs, attrs, ctx):
    return (_resize(inputs[0], _floats(inputs[1]), None, None, attrs, ctx, opset10=True),)


@op("Constant", 1)
def _constant(inputs, attrs, ctx):
    for key in ("value", "sparse_value"):
        if key in attrs:
            return (attrs[key],)
    if "value_float" in attrs:
        return (torch.tensor(attrs["value_float"], dtype=torch.float32),)
    if "value_floats" in attrs:
        return (torch.tensor(attrs["value_floats"], dtype=torch.float32),)
    if "value_int" in attrs:
        return (torch.tensor(attrs["value_int"], dtype=torch.int64),)
    if "value_ints" in attrs:
        return (torch.tensor(attrs["value_ints"], dtype=torch.int64),)
    raise CloakError(f"Constant node {ctx.name!r}: string constants are not supported")


def _check_constant(attrs, ctx):
    if "value_string" in attrs or "value_strings" in attrs:
        return "string constants"
    return None


for _entry in _OPS["Constant"]:
    _entry.check = _check_constant


# Input positions that handlers only turn into Python numbers (shapes, axes, pads, sizes, k).
_HOST_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Split": (1,),
    "Slice": (1, 2, 3, 4),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Trilu": (1,),
    "TopK": (1,),
    "CumSum": (1,),
    "OneHot": (1,),
    "Pad": (1, 2, 3),
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    **{name: (1,) for name in _REDUCERS},
}


# --------------------------------------------------------------------------------------------
# Model analysis
# --------------------------------------------------------------------------------------------


def _prepared(model: onnx.ModelProto) -> onnx.ModelProto:
    """Inline model-local functions, so their bodies are checked and run like any other node."""
    if len(model.functions):
        from onnx import inliner

        model = inliner.inline_local_functions(model)
    return model


def _opsets(model: onnx.ModelProto) -> dict[str, int]:
    out = {}
    for imp in model.opset_import:
        out["" if imp.domain in DEFAULT_DOMAINS else imp.domain] = imp.version
    return out


def _op_key(node: onnx.NodeProto) -> str:
    return node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"


def _scan(model: onnx.ModelProto) -> dict[tuple[str, int], str | None]:
    """Every unsupported (op, opset) with a reason when the op exists but a setting is missing."""
    opsets = _opsets(model)
    bad: dict[tuple[str, int], str | None] = {}

    def visit(graph: onnx.GraphProto):
        for node in graph.node:
            domain = "" if node.domain in DEFAULT_DOMAINS else node.domain
            version = opsets.get(domain, 0)
            key = (_op_key(node), version)
            if domain:
                bad.setdefault(key, None)
                continue
            entry = _resolve(node.op_type, version)
            if entry is None:
                bad.setdefault(key, None)
                continue
            attrs = _attrs(node)
            reason = None
            if any(v is _UNPARSED for v in attrs.values()):
                reason = "subgraph or type attributes"
            elif entry.check is not None:
                ctx = NodeContext(node.name, node.op_type, version, entry.since, list(node.output))
                reason = entry.check(attrs, ctx)
            if reason is not None:
                bad[key] = reason
            for a in node.attribute:  # nested graphs are unsupported; still list their ops
                for g in list(a.graphs) + ([a.g] if a.HasField("g") else []):
                    visit(g)

    visit(model.graph)
    return bad


def unsupported_ops(model: onnx.ModelProto) -> list[tuple[str, int]]:
    """Ops this executor cannot run, as sorted unique (op_type, opset of its domain); [] if none.

    Ops outside the default ONNX domain are named ``domain::op_type``.
    """
    return sorted(_scan(_prepared(model)))


def _raise_if_unsupported(model: onnx.ModelProto) -> None:
    bad = _scan(model)
    if bad:
        keys = sorted(bad)
        raise UnsupportedOpsError(keys, {k: v for k, v in bad.items() if v})


def _toposort(graph: onnx.GraphProto, known: set[str]) -> list[onnx.NodeProto]:
    """Nodes in an order where every input is produced first (stable for sorted graphs)."""
    nodes = list(graph.node)
    available = set(known) | {""}
    order, pending = [], nodes
    while pending:
        rest = []
        for node in pending:
            if all(i in available for i in node.input):
                order.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if len(rest) == len(pending):
            missing = sorted({i for n in rest for i in n.input if i not in available})
            raise CloakError(f"the ONNX graph has inputs no node produces: {', '.join(missing[:10])}")
        pending = rest
    return order


def _uses_wide_or_narrow_floats(model: onnx.ModelProto) -> bool:
    g = model.graph
    types = [t.data_type for t in g.initializer]
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.HasField("tensor_type"):
            types.append(vi.type.tensor_type.elem_type)
    for node in g.node:
        for a in node.attribute:
            if node.op_type == "Cast" and a.name == "to" and a.type == onnx.AttributeProto.INT:
                types.append(a.i)
            if a.type == onnx.AttributeProto.TENSOR:
                types.append(a.t.data_type)
    return any(t in _FLOAT32_STANDINS for t in types)


# Ops worth folding when all inputs are constant; big broadcasts stay lazy (see _fold_limit).
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
_FOLD_MAX_ELEMENTS = 1 << 22


@dataclass
class _Step:
    fn: Handler
    ins: tuple[int, ...]
    outs: tuple[int, ...]
    attrs: dict
    ctx: NodeContext
    free: tuple[int, ...] = ()


class OnnxTorchModule(torch.nn.Module):
    """An ONNX graph as a torch module: same outputs as onnxruntime, plus autograd.

    ``outputs`` may name any tensor of the graph (for example a feature tensor before the head);
    only the nodes it depends on run. Floating-point tensors are computed in float32; the flag
    ``computes_in_float32`` is True when the model had float16, bfloat16 or float64 tensors.
    """

    def __init__(self, model: onnx.ModelProto, outputs: Sequence[str] | None = None):
        super().__init__()
        model = _prepared(model)
        _raise_if_unsupported(model)
        graph = model.graph
        opset = _opsets(model).get("", 1)
        self.computes_in_float32 = _uses_wide_or_narrow_floats(model)
        self.opset = opset

        consts: dict[str, torch.Tensor] = {t.name: tensor_from_proto(t) for t in graph.initializer}
        for sp in graph.sparse_initializer:
            consts[sp.values.name] = _sparse_to_dense(sp)
        self.input_names = [i.name for i in graph.input if i.name not in consts]
        self._input_is_float = [
            i.type.tensor_type.elem_type in _FLOAT32_STANDINS | {TensorProto.FLOAT} for i in graph.input if i.name not in consts
        ]
        self.output_names = list(outputs) if outputs is not None else [o.name for o in graph.output]

        nodes = _toposort(graph, set(consts) | set(self.input_names))
        produced = set(consts) | set(self.input_names) | {o for n in nodes for o in n.output}
        missing = [o for o in self.output_names if o not in produced]
        if missing:
            raise CloakError(f"no tensor named {', '.join(map(repr, missing))} in the graph")

        # Resolve handlers and fold nodes whose inputs are all constant (Constant nodes included).
        steps: list[tuple[onnx.NodeProto, _OpVersion, dict, NodeContext]] = []
        for node in nodes:
            entry = _resolve(node.op_type, opset)
            attrs = _attrs(node)
            ctx = NodeContext(node.name or node.op_type, node.op_type, opset, entry.since, list(node.output))
            if all(i == "" or i in consts for i in node.input) and node.op_type not in _NO_FOLD:
                folded = self._try_fold(entry, node, attrs, ctx, consts)
                if folded is not None:
                    for name, value in zip(node.output, folded):
                        if name:
                            consts[name] = value
                    continue
            steps.append((node, entry, attrs, ctx))

        # Keep only what the requested outputs depend on.
        needed = set(self.output_names)
        kept = []
        for node, entry, attrs, ctx in reversed(steps):
            if any(o in needed for o in node.output if o):
                kept.append((node, entry, attrs, ctx))
                needed.update(i for i in node.input if i)
        kept.reverse()

        # Slots: 0 always holds None (omitted optional inputs); 1 swallows unnamed outputs.
        slot: dict[str, int] = {}

        def slot_of(name: str) -> int:
            if name == "":
                return 0
            if name not in slot:
                slot[name] = len(slot) + 2
            return slot[name]

        self._input_slots = [slot_of(n) for n in self.input_names]
        # Constant shape/axes/pads/sizes inputs are only ever read as Python numbers: they get a
        # CPU copy in a slot of their own, so reading them never waits on a GPU.
        host: dict[int, torch.Tensor] = {}
        plan = []
        for node, entry, attrs, ctx in kept:
            host_positions = _HOST_INPUTS.get(node.op_type, ())
            ins = []
            for j, name in enumerate(node.input):
                if j in host_positions and name in consts:
                    s = slot_of("host:" + name)
                    host[s] = consts[name]
                    ins.append(s)
                else:
                    ins.append(slot_of(name))
            outs = tuple(slot_of(o) if o else 1 for o in node.output)
            plan.append(_Step(entry.fn, tuple(ins), outs, attrs, ctx))
        device_consts = {n for n in consts if n in slot} | (set(self.output_names) & set(consts))
        self._const_slots: list[tuple[int, str]] = []
        buffer_of: dict[int, str] = {}
        for name in sorted(device_consts):
            tensor = consts[name]
            bname = buffer_of.get(id(tensor))
            if bname is None:  # one buffer per distinct tensor (Identity of a weight shares it)
                bname = f"c{len(buffer_of)}"
                buffer_of[id(tensor)] = bname
                self.register_buffer(bname, tensor)
            self._const_slots.append((slot_of(name), bname))
        self._output_slots = [slot_of(o) for o in self.output_names]
        # Float inputs follow the module's float dtype: float32, or float64 after .double().
        self.register_buffer("float_dtype_probe", torch.empty(0), persistent=False)

        # Liveness: free each intermediate right after its last reader.
        keep = set(self._output_slots) | {s for s, _ in self._const_slots} | set(host) | {0}
        last: dict[int, int] = {}
        for k, step in enumerate(plan):
            for s in step.ins:
                last[s] = k
            for s in step.outs:  # never-read outputs die where they are born
                last.setdefault(s, k)
        for k, step in enumerate(plan):
            step.free = tuple(sorted({s for s in step.ins + step.outs if last.get(s) == k and s not in keep}))
        self._plan = plan
        self._env_template = [host.get(i) for i in range(len(slot) + 2)]

    @staticmethod
    def _try_fold(entry, node, attrs, ctx, consts):
        ins = [consts[i] if i else None for i in node.input]
        budget = max(_FOLD_MAX_ELEMENTS, 2 * sum(t.numel() for t in ins if t is not None))
        try:
            with torch.no_grad():
                outs = entry.fn(ins, attrs, ctx)
        except Exception as exc:  # noqa: BLE001 - report with the node's name
            raise CloakError(f"{node.op_type} node {ctx.name!r} failed on constant inputs: {exc}") from exc
        outs = list(outs)
        if any(isinstance(o, torch.Tensor) and o.numel() > budget for o in outs):
            return None
        return [o.contiguous() if isinstance(o, torch.Tensor) and not o.is_contiguous() else o for o in outs]

    def forward(self, *inputs: torch.Tensor):
        if len(inputs) != len(self._input_slots):
            raise CloakError(f"the model takes {len(self._input_slots)} input(s) ({', '.join(self.input_names)}), got {len(inputs)}")
        env = list(self._env_template)
        buffers = self._buffers
        for s, name in self._const_slots:
            env[s] = buffers[name]
        float_dtype = buffers["float_dtype_probe"].dtype
        for s, x, is_float in zip(self._input_slots, inputs, self._input_is_float):
            if is_float and x.dtype != float_dtype:
                x = x.to(float_dtype)
            env[s] = x
        for step in self._plan:
            try:
                outs = step.fn([env[i] for i in step.ins], step.attrs, step.ctx)
            except CloakError:
                raise
            except Exception as exc:
                ctx = step.ctx
                raise CloakError(f"{ctx.op_type} node {ctx.name!r} (opset {ctx.opset}) failed in the torch executor: {exc}") from exc
            for s, o in zip(step.outs, outs):
                env[s] = o
            for s in step.free:
                env[s] = None
        if len(self._output_slots) == 1:
            return env[self._output_slots[0]]
        return tuple(env[s] for s in self._output_slots)

    def extra_repr(self) -> str:
        return f"opset={self.opset}, steps={len(self._plan)}, inputs={self.input_names}, outputs={self.output_names}"

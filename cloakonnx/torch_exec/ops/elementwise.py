"""Elementwise ops: arithmetic, unary math and activations, comparisons and logic, Clip, casts.

One file for every op that maps each element (or each broadcast pair) on its own, so the
opset < 7 broadcast rules and the shared handler factories live next to all their users.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from onnx import TensorProto

from ...errors import CloakError
from ..registry import op
from ..tensors import _empty, _is_float, _norm_axis, _onnx_dtype


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


# 1 and 6: the limited broadcast (broadcast=1, axis); 1 only adds consumed_inputs, an in-place hint
# with no effect on values. 7: numpy broadcasting. 13, 14: more types.
for _name, _fn in {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul}.items():
    op(_name, 1, 6, 7, 13, 14)(_binary(_fn))


def _div(a, b):
    if _is_float(a) or _is_float(b):
        return torch.div(a, b)
    return torch.div(a, b, rounding_mode="trunc")  # C-style integer division, as onnxruntime


op("Div", 1, 6, 7, 13, 14)(_binary(_div))


@op("Pow", 1, 7, 12, 13, 15)  # 12: the exponent may have another type
def _pow(inputs, attrs, ctx):
    x, y = _legacy_broadcast(inputs[0], inputs[1], attrs) if ctx.since < 7 else inputs
    return (torch.pow(x, y).to(x.dtype),)


@op("Mod", 10, 13, 28)  # 28 defines fmod=0 on floats as A - floor(A / B) * B: torch.remainder
def _mod(inputs, attrs, ctx):
    a, b = inputs
    if attrs.get("fmod", 0):
        return (torch.fmod(a, b),)
    return (torch.remainder(a, b),)


def _unary(fn):
    def handler(inputs, attrs, ctx):
        return (fn(inputs[0]),)

    return handler


def _pairwise(fn):
    def handler(inputs, attrs, ctx):
        return (fn(inputs[0], inputs[1]),)

    return handler


# Unary ops and their since_versions: 1 -> 6 drops consumed_inputs (an in-place hint), the other
# steps only add types.
_UNARY = {
    "Sqrt": (torch.sqrt, (1, 6, 13)),
    "Exp": (torch.exp, (1, 6, 13)),
    "Log": (torch.log, (1, 6, 13)),
    "Neg": (torch.neg, (1, 6, 13)),
    "Abs": (torch.abs, (1, 6, 13)),
    "Reciprocal": (torch.reciprocal, (1, 6, 13)),
    "Relu": (torch.relu, (1, 6, 13, 14)),
    "Sigmoid": (torch.sigmoid, (1, 6, 13)),
    "Tanh": (torch.tanh, (1, 6, 13)),
    "Softplus": (F.softplus, (1, 22)),
    "Softsign": (F.softsign, (1, 22)),
    "Floor": (torch.floor, (1, 6, 13)),
    "Ceil": (torch.ceil, (1, 6, 13)),
    "Round": (torch.round, (11, 22)),  # round half to even, as ONNX
    "Sign": (torch.sign, (9, 13)),
    "Not": (torch.logical_not, (1,)),
    "Identity": (lambda x: x, (1, 13, 14, 16, 19, 21, 23, 24, 25)),  # 14, 16: sequences, optionals
    "Sin": (torch.sin, (7, 22)),
    "Cos": (torch.cos, (7, 22)),
    "Erf": (torch.erf, (9, 13)),
    "IsNaN": (torch.isnan, (9, 13, 20)),
    "Mish": (F.mish, (18, 22)),
}
# Comparisons and logic from opset 7 (numpy broadcasting); their opset-1 versions broadcast the
# limited way (broadcast=1, axis) and are not served.
_COMPARE = {
    "Equal": (torch.eq, (7, 11, 13, 19)),
    "Less": (torch.lt, (7, 9, 13)),
    "Greater": (torch.gt, (7, 9, 13)),
    "And": (torch.logical_and, (7,)),
    "Or": (torch.logical_or, (7,)),
    "Xor": (torch.logical_xor, (7,)),
}
for _name, (_fn, _versions) in _UNARY.items():
    op(_name, *_versions)(_unary(_fn))
for _name, (_fn, _versions) in _COMPARE.items():
    op(_name, *_versions)(_pairwise(_fn))
op("LessOrEqual", 12, 16)(_pairwise(torch.le))
op("GreaterOrEqual", 12, 16)(_pairwise(torch.ge))


@op("IsInf", 10, 20)
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


@op("LeakyRelu", 1, 6, 16)
def _leaky_relu(inputs, attrs, ctx):
    return (F.leaky_relu(inputs[0], attrs.get("alpha", 0.01)),)


@op("PRelu", 7, 9, 16)  # 1 and 6 spread a 1-D slope over channels, not by broadcasting
def _prelu(inputs, attrs, ctx):
    x, slope = inputs
    return (torch.where(x < 0, x * slope, x),)


@op("Elu", 1, 6, 22)
def _elu(inputs, attrs, ctx):
    return (F.elu(inputs[0], attrs.get("alpha", 1.0)),)


@op("Celu", 12, 28)
def _celu(inputs, attrs, ctx):
    return (F.celu(inputs[0], attrs.get("alpha", 1.0)),)


@op("Selu", 6, 22)  # 1 had other defaults (alpha 1.6732, gamma 1.0507)
def _selu(inputs, attrs, ctx):
    alpha = attrs.get("alpha", 1.67326319217681884765625)
    gamma = attrs.get("gamma", 1.05070102214813232421875)
    return (gamma * F.elu(inputs[0], alpha),)


@op("ThresholdedRelu", 10, 22)
def _thresholded_relu(inputs, attrs, ctx):
    x = inputs[0]
    return (torch.where(x > attrs.get("alpha", 1.0), x, torch.zeros_like(x)),)


@op("HardSigmoid", 1, 6, 22)
def _hard_sigmoid(inputs, attrs, ctx):
    """torch's one-kernel F.hardsigmoid where the slope is its 1/6 (torch and Paddle exports, and
    fused decompositions); ONNX's default slope 0.2 and others as clamp(alpha * x + beta, 0, 1)."""
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    if abs(alpha - 1 / 6) <= 1e-6 and abs(beta - 0.5) <= 1e-6:
        return (F.hardsigmoid(inputs[0]),)
    return (torch.clamp(inputs[0] * alpha + beta, 0.0, 1.0),)


@op("HardSwish", 14, 22)
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


@op("Where", 9, 16)
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


# Before 8 all inputs had one shape (broadcasting them changes nothing); 8 broadcasts.
op("Max", 1, 6, 8, 12, 13)(_variadic(torch.maximum))
op("Min", 1, 6, 8, 12, 13)(_variadic(torch.minimum))
op("Sum", 1, 6, 8, 13)(_variadic(torch.add))
op("Mean", 1, 6, 8, 13)(_variadic(torch.add, mean=True))


@op("Clip", 1, 6)
def _clip_attr(inputs, attrs, ctx):
    return (torch.clamp(inputs[0], attrs.get("min", -math.inf), attrs.get("max", math.inf)),)


@op("Clip", 11, 12, 13)  # 13: min > max gives max, as torch.clamp
def _clip(inputs, attrs, ctx):
    x = inputs[0]
    lo = inputs[1] if len(inputs) > 1 and not _empty(inputs[1]) else None
    hi = inputs[2] if len(inputs) > 2 and not _empty(inputs[2]) else None
    if lo is None and hi is None:
        return (x,)
    return (torch.clamp(x, lo.reshape(()) if lo is not None else None, hi.reshape(()) if hi is not None else None),)


@op("Cast", 1, 6, 9, 13, 19, 21, 23, 24, 25, 28)  # 19+: saturate/round_mode, float8 and other types only
def _cast(inputs, attrs, ctx):
    to = attrs["to"]
    if isinstance(to, str):  # opset 1 named the type
        to = TensorProto.DataType.Value(to.upper())
    return (inputs[0].to(_onnx_dtype(to)),)


@op("CastLike", 15, 19, 21, 23, 24, 25)
def _cast_like(inputs, attrs, ctx):
    return (inputs[0].to(inputs[1].dtype),)


@op("Dropout", 7, 10, 12, 13, 22, host_inputs=(1, 2))  # 1, 6: is_test=0 (the default) means training
def _dropout(inputs, attrs, ctx):
    """Inference: the identity, with an all-true mask when the mask output is wanted. From opset 12
    a true ``training_mode`` input asks for random dropout, which is refused."""
    x = inputs[0]
    if len(inputs) > 2 and not _empty(inputs[2]) and bool(inputs[2].reshape(-1)[0]):
        raise CloakError(f"Dropout node {ctx.name!r}: training_mode=1 (random dropout) is not supported by the torch executor")
    if ctx.wants(1):
        return (x, torch.ones_like(x, dtype=torch.bool if ctx.opset >= 10 else x.dtype))
    return (x,)

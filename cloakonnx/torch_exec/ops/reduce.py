"""Reductions and other along-an-axis ops: Reduce*, ArgMax/ArgMin, TopK, CumSum.

The Reduce ops take ``axes`` as an attribute up to some opset and as an input after it; one table
of reducers serves both forms, with the noop_with_empty_axes rules in one place.
"""
from __future__ import annotations

import numpy as np
import torch

from ..registry import op
from ..tensors import _ints, _is_float, _norm_axes, _norm_axis, _scalar


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
# since_versions of the attribute form (axes an attribute; 11 allows negative axes) and of the
# input form (axes an input, noop_with_empty_axes): 13 for ReduceSum, 18 for the others.
_VERSIONS = {
    "ReduceSum": ((1, 11), (13,)),
    "ReduceMax": ((1, 11, 12, 13), (18, 20)),  # 20: booleans
    "ReduceMin": ((1, 11, 12, 13), (18, 20)),
    "ReduceLogSum": ((1, 11, 13), (18, 28)),  # 28: no more integer types
    "ReduceLogSumExp": ((1, 11, 13), (18, 28)),
}
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
    _attr_versions, _input_versions = _VERSIONS.get(_name, ((1, 11, 13), (18,)))
    op(_name, *_attr_versions, host_inputs=(1,))(_attr_form)
    op(_name, *_input_versions, host_inputs=(1,))(_input_form)


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


op("ArgMax", 1, 11, 12, 13)(_arg(torch.argmax))  # 12: select_last_index
op("ArgMin", 1, 11, 12, 13)(_arg(torch.argmin))


@op("TopK", 10, 11, 24, host_inputs=(1,))  # 11: largest, sorted
def _topk(inputs, attrs, ctx):
    x, k = inputs[0], int(_scalar(inputs[1]))
    axis = _norm_axis(attrs.get("axis", -1), x.dim())
    values, idx = torch.topk(x, k, axis, largest=bool(attrs.get("largest", 1)), sorted=True)
    return (values, idx)


@op("TopK", 1, host_inputs=(1,))
def _topk_attr(inputs, attrs, ctx):
    return _topk([inputs[0], attrs["k"]], attrs, ctx)


@op("CumSum", 11, 14, host_inputs=(1,))
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

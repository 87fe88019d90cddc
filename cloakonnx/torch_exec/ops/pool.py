"""Pooling: MaxPool (with ONNX-style indices), AveragePool, GlobalAveragePool, GlobalMaxPool.

Kept apart from convolution because ONNX pads and counts pooling windows differently from torch
(asymmetric pads, count_include_pad, indices over the whole tensor), which is most of this file.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import op
from ..tensors import _channels_last, _is_float, _pt_pad
from .spatial import _spatial_pads


_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}
_AVGPOOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _pool_geometry(x, attrs):
    """(kernel, strides, dilations, begins, ends, ceil_mode) of a pooling node on ``x``."""
    kernel = attrs["kernel_shape"]
    n = len(kernel)
    strides = attrs.get("strides", [1] * n)
    dilations = attrs.get("dilations", [1] * n)
    begins, ends = _spatial_pads(x, attrs, kernel, strides, dilations)
    return kernel, strides, dilations, list(begins), list(ends), bool(attrs.get("ceil_mode", 0))


def _check_pool(attrs, ctx):
    if len(attrs.get("kernel_shape", [])) not in _MAXPOOL:
        return "only 1-d, 2-d and 3-d pooling"
    return None


def _check_avgpool(attrs, ctx):
    if any(d != 1 for d in attrs.get("dilations", [])):
        return "AveragePool with dilations"
    return _check_pool(attrs, ctx)


@op("MaxPool", 1, 8, 10, 11, 12, 22, check=_check_pool)  # 8: indices, 10: ceil_mode, dilations
def _max_pool(inputs, attrs, ctx):
    x = inputs[0]
    kernel, strides, dilations, begins, ends, ceil = _pool_geometry(x, attrs)
    n = len(kernel)
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


@op("AveragePool", 1, 7, 10, 11, 19, 22, check=_check_avgpool)  # 7: count_include_pad, 10: ceil_mode
def _avg_pool(inputs, attrs, ctx):
    x = inputs[0]
    kernel, strides, _dil, begins, ends, ceil = _pool_geometry(x, attrs)
    n = len(kernel)
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


@op("GlobalAveragePool", 1, 22)
def _global_avg_pool(inputs, attrs, ctx):
    x = inputs[0]
    if x.dim() == 4:
        if torch.is_grad_enabled() and x.requires_grad and _channels_last(x):
            x = _ChannelsLastGrad.apply(x)
        return (F.adaptive_avg_pool2d(x, 1),)
    return (x.mean(tuple(range(2, x.dim())), keepdim=True),)


class _ChannelsLastGrad(torch.autograd.Function):
    """The identity, whose backward hands the gradient on channels-last. adaptive_avg_pool2d's
    backward returns it contiguous whatever the input's layout, and the layers before the pool then
    ran their backward in oneDNN's mixed-layout path (PP-LCNet's last block: 13 ms, now 7 ms)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous(memory_format=torch.channels_last)


@op("GlobalMaxPool", 1, 22)
def _global_max_pool(inputs, attrs, ctx):
    x = inputs[0]
    return (x.amax(tuple(range(2, x.dim())), keepdim=True),)

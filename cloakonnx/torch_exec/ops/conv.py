"""Matrix products and convolutions: MatMul, Gemm, Einsum, Conv, ConvTranspose.

The ops that carry a model's weights, kept together because they share the same concerns:
matching torch's kernels (F.linear for the nn.Linear export, F.convNd) and turning ONNX's
explicit or automatic padding into what torch accepts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import op
from ..tensors import _pt_pad
from .spatial import _spatial_pads


@op("MatMul", 1, 9, 13)
def _matmul(inputs, attrs, ctx):
    return (torch.matmul(inputs[0], inputs[1]),)


@op("Gemm", 1, 6, 7, 9, 11, 13)  # 1, 6: broadcast=1 is the suffix broadcast numpy does; 11: C optional
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


@op("Einsum", 12, 28)
def _einsum(inputs, attrs, ctx):
    return (torch.einsum(attrs["equation"].replace(" ", ""), *inputs),)


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _check_conv(attrs, ctx):
    k = attrs.get("kernel_shape")
    if k is not None and len(k) not in _CONV:
        return f"{len(k)}-d convolution"
    return None


def _check_conv_transpose(attrs, ctx):
    """Opset 11 reversed which side gets the odd pad for auto_pad SAME_* and output_shape; the
    handler follows 11 and onnxruntime, so before 11 only explicit pads are run."""
    if ctx.since < 11 and ("output_shape" in attrs or attrs.get("auto_pad", "NOTSET") in ("SAME_UPPER", "SAME_LOWER")):
        return "ConvTranspose output_shape or auto_pad SAME_* before opset 11"
    return _check_conv(attrs, ctx)


@op("Conv", 1, 11, 22, check=_check_conv)
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


@op("ConvTranspose", 1, 11, 22, check=_check_conv_transpose)
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

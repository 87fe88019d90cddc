"""Matrix products and convolutions: MatMul, Gemm, Einsum, Conv, ConvTranspose.

The ops that carry a model's weights, kept together because they share the same concerns:
matching torch's kernels (F.linear for the nn.Linear export, F.convNd) and turning ONNX's
explicit or automatic padding into what torch accepts.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..registry import _OpVersion, op
from ..tensors import _channels_last, _pt_pad
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
    group = attrs.get("group", 1)
    if _grad_by_phases(x, w, b, strides, dilations, group):
        return (_PhasedConv.apply(x, w, b, strides[0], begins),)
    return (_CONV[n](x, w, b, strides, begins, dilations, group),)


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


# --------------------------------------------------------------------------------------------
# Input gradients of stems (few input channels, a large kernel at a stride), by phases
# --------------------------------------------------------------------------------------------


def _grad_by_phases(x, w, b, strides, dilations, groups) -> bool:
    """Whether this Conv's input gradient is the one an attack needs and is cheaper by phases.

    oneDNN's backward-data kernel for a stem such as ResNet's 7x7/2 over 3 channels, or a ViT's
    16x16/16 patch embedding, costs 3-6 times the forward pass; by phases it costs 0.16-0.6 of
    oneDNN's (benchmarks/stem_grads.py). At 3x3/2 channels-last there is no gain: left alone.
    """
    return (torch.is_grad_enabled() and x.requires_grad and x.dim() == 4 and x.device.type == "cpu"
            and not w.requires_grad and (b is None or not b.requires_grad) and groups == 1 and w.shape[1] <= 4
            and strides[0] == strides[1] >= 2 and min(w.shape[2:]) >= 4 and all(d == 1 for d in dilations))


def _phase_weight(w: torch.Tensor, s: int) -> torch.Tensor:
    """The weight of one stride-1 convolution of the output gradient whose C*s*s output channels
    are the input gradient's s*s phases, in F.pixel_shuffle's order.

    Along an axis, input position n with n + pad = s*q + r receives sum_m gz[q - m] * w[r + s*m]:
    phase r is a correlation of gz with the taps r, r + s, r + 2s, ... reversed (zeros past the kernel).
    """
    co, ci, kh, kw = w.shape
    mh, mw = -(-kh // s), -(-kw // s)
    taps = F.pad(w, (0, s * mw - kw, 0, s * mh - kh)).reshape(co, ci, mh, s, mw, s).flip(2, 4)
    return taps.permute(1, 3, 5, 0, 2, 4).reshape(ci * s * s, co, mh, mw)


def _input_grad_by_phases(grad, x_shape, memory_format, w, s, pads):
    """d(conv2d(x, w, stride=s, padding=pads))/dx applied to ``grad``, as a stride-1 convolution
    and a pixel shuffle: the same sums as the transposed convolution, in another order."""
    k = _phase_weight(w, s)
    mh, mw = k.shape[2:]
    g = F.pixel_shuffle(F.conv2d(grad, k, None, 1, (mh - 1, mw - 1)), s)
    h, wd = x_shape[2:]
    g = g[:, :, pads[0]:pads[0] + h, pads[1]:pads[1] + wd]
    if tuple(g.shape[2:]) != (h, wd):  # positions no output window reaches: gradient 0
        g = F.pad(g, (0, wd - g.shape[3], 0, h - g.shape[2]))
    return g.contiguous(memory_format=memory_format)


class _PhasedConv(torch.autograd.Function):
    """conv2d whose input gradient is computed by phases (the weights are constants)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, pads):
        ctx.save_for_backward(w)
        layout = torch.channels_last if _channels_last(x) else torch.contiguous_format
        ctx.conf = (x.shape, layout, stride, list(pads))
        return F.conv2d(x, w, b, stride, pads)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return _input_grad_by_phases(grad, *ctx.conf[:2], w, *ctx.conf[2:]), None, None, None, None


# --------------------------------------------------------------------------------------------
# Conv + HardSwish run in one kernel (fuse.py: a Conv whose only reader is a HardSwish defers to it)
# --------------------------------------------------------------------------------------------

# Above this many multiply-adds per output element (input channels per group x kernel size) the
# convolution costs more to run again in the backward pass than the activation pass it saves.
_RECOMPUTE_MAX_MACS = 27


def _mkldnn_conv_args(x, w, b, attrs):
    """(stride, padding, dilation, groups) when oneDNN can run this 2-d Conv with the activation
    fused in (CPU, float32, symmetric pads), else None."""
    if (w.dim() != 4 or x.dim() != 4 or x.device.type != "cpu" or x.dtype != torch.float32
            or w.dtype != torch.float32 or (b is not None and b.dtype != torch.float32)
            or w.requires_grad or (b is not None and b.requires_grad) or not torch.backends.mkldnn.is_available()):
        return None
    kernel = attrs.get("kernel_shape") or list(w.shape[2:])
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    begins, ends = _spatial_pads(x, attrs, kernel, strides, dilations)
    if list(begins) != list(ends):
        return None
    return list(strides), list(begins), list(dilations), attrs.get("group", 1)


class _ConvHardSwish(torch.autograd.Function):
    """hardswish(conv2d(x, w, b)) in one oneDNN kernel; the backward pass computes the convolution
    again (cheap for depthwise and narrow ones) instead of keeping its output, and gives the
    gradient with respect to ``x`` only (the weights are constants)."""

    @staticmethod
    def forward(ctx, x, w, b, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w, b)
        ctx.conf = (stride, padding, dilation, groups)
        return torch.ops.mkldnn._convolution_pointwise(x, w, b, padding, stride, dilation, groups, "hardswish", [], "")

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, w, b = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        z = F.conv2d(x, w, b, stride, padding, dilation, groups)  # the same kernel as the unfused Conv
        gz = torch.ops.aten.hardswish_backward(grad, z)
        del z
        gx = torch.ops.aten.convolution_backward(gz, x, w, None, stride, padding, dilation, False, [0, 0], groups,
                                                 [True, False, False])[0]
        return gx, None, None, None, None, None, None


class _ConvCall(NamedTuple):
    """A Conv not run yet: what its only reader, a HardSwish step, needs to run it fused."""

    inputs: list
    attrs: dict
    ctx: object


def _deferred_conv(inputs, attrs, ctx):
    return (_ConvCall(inputs, attrs, ctx),)


def _conv_hard_swish(inputs, attrs, ctx):
    call = inputs[0]
    x, w = call.inputs[0], call.inputs[1]
    b = call.inputs[2] if len(call.inputs) > 2 else None
    args = _mkldnn_conv_args(x, w, b, call.attrs)
    if args is not None:
        if not (torch.is_grad_enabled() and x.requires_grad):
            with torch.no_grad():
                return (torch.ops.mkldnn._convolution_pointwise(x, w, b, args[1], args[0], args[2], args[3], "hardswish", [], ""),)
        if w.shape[1] * w.shape[2] * w.shape[3] <= _RECOMPUTE_MAX_MACS:
            return (_ConvHardSwish.apply(x, w, b, *args),)
    return (F.hardswish(_conv(call.inputs, call.attrs, call.ctx)[0]),)


DEFERRED_CONV = _OpVersion(since=1, fn=_deferred_conv, check=None)
CONV_HARD_SWISH = _OpVersion(since=14, fn=_conv_hard_swish, check=None)

"""Normalisation layers: Batch-, Instance-, Layer-, Group-, LpNormalization and LRN (inference only).

Grouped because they share the per-version details of how statistics and affine parameters are
laid out (BatchNormalization's spatial=0 before opset 9, GroupNormalization's per-group scale in 18).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..registry import op
from ..tensors import _norm_axis


def _check_bn(attrs, ctx):
    if attrs.get("training_mode", 0):
        return "training_mode=1 (only inference is supported)"
    if ctx.since < 14 and any(ctx.wants(i) for i in range(1, 5)):
        return "statistics outputs, which mean training before opset 14 (only inference is supported)"
    return None


@op("BatchNormalization", 7, 9, 14, 15, check=_check_bn)  # 1, 6: is_test=0 (default) is training
def _batch_norm(inputs, attrs, ctx):
    x, scale, bias, mean, var = inputs[:5]
    eps = attrs.get("epsilon", 1e-5)
    per_activation = ctx.since < 9 and attrs.get("spatial", 1) == 0
    if per_activation or mean.requires_grad or var.requires_grad:  # F.batch_norm has no gradient for statistics
        shape = (1,) + tuple(scale.shape) if per_activation else (1, -1) + (1,) * (x.dim() - 2)
        y = (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + eps) * scale.reshape(shape) + bias.reshape(shape)
    else:
        y = F.batch_norm(x, mean, var, scale, bias, False, 0.0, eps)
    return (y, mean, var) if ctx.n_outputs > 1 else (y,)  # inference: statistics pass through


@op("InstanceNormalization", 1, 6, 22)
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


@op("GroupNormalization", 18, 21)  # 21: per-channel scale, stash_type
def _group_norm(inputs, attrs, ctx):
    x, scale, bias = inputs
    groups = attrs["num_groups"]
    channels = x.shape[1]
    if ctx.since < 21 and scale.numel() == groups and groups != channels:  # v18: per-group affine
        scale = scale.repeat_interleave(channels // groups)
        bias = bias.repeat_interleave(channels // groups)
    return (F.group_norm(x, groups, scale, bias, attrs.get("epsilon", 1e-5)),)


@op("LpNormalization", 1, 22)
def _lp_norm(inputs, attrs, ctx):
    x = inputs[0]
    p = attrs.get("p", 2)
    norm = torch.linalg.vector_norm(x, p, dim=attrs.get("axis", -1), keepdim=True)
    return (x / norm,)


@op("LRN", 1, 13)
def _lrn(inputs, attrs, ctx):
    """Local response normalisation across channels, written out rather than F.local_response_norm:
    for an even ``size`` torch centres the window one channel later than ONNX (and onnxruntime),
    which put floor((size-1)/2) channels before c and ceil((size-1)/2) after."""
    x = inputs[0]
    size = attrs["size"]
    alpha, beta, bias = attrs.get("alpha", 1e-4), attrs.get("beta", 0.75), attrs.get("bias", 1.0)
    n, c = x.shape[0], x.shape[1]
    sq = (x * x).reshape(n, 1, c, -1)  # channels as the height of a one-plane image
    sq = F.pad(sq, (0, 0, (size - 1) // 2, size // 2))
    mean_sq = F.avg_pool2d(sq, (size, 1), stride=1).reshape(x.shape)  # square_sum / size
    return (x / (bias + alpha * mean_sq) ** beta,)

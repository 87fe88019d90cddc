"""Resize and Upsample: one separable pass per resized axis, sampling exactly as the spec says.

Every coordinate transformation mode and nearest/linear/cubic sampling is written out here
(torch's interpolate matches only some of them); per-shape indices and weights are memoised in
the node's context.
"""
from __future__ import annotations

import math

import torch

from ...errors import CloakError
from ..registry import op
from ..tensors import _empty, _floats, _ints, _norm_axes


_COORD_MODES = (
    "half_pixel",
    "half_pixel_symmetric",
    "pytorch_half_pixel",
    "align_corners",
    "asymmetric",
    "tf_half_pixel_for_nn",
    "tf_crop_and_resize",
)


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


@op("Resize", 10, check=_check_resize, host_inputs=(1, 2, 3))
def _resize_v10(inputs, attrs, ctx):
    return (_resize(inputs[0], _floats(inputs[1]), None, None, attrs, ctx, opset10=True),)


# 13: roi and scales optional, 18: axes, keep_aspect_ratio_policy, antialias, 19: half_pixel_symmetric
@op("Resize", 11, 13, 18, 19, check=_check_resize, host_inputs=(1, 2, 3))
def _resize_v11(inputs, attrs, ctx):
    x = inputs[0]
    roi = _floats(inputs[1]) if len(inputs) > 1 and not _empty(inputs[1]) else None
    scales = _floats(inputs[2]) if len(inputs) > 2 and not _empty(inputs[2]) else None
    sizes = _ints(inputs[3]) if len(inputs) > 3 and not _empty(inputs[3]) else None
    return (_resize(x, scales, sizes, roi, attrs, ctx),)


@op("Upsample", 7, check=_check_resize, host_inputs=(1,))
def _upsample_attr(inputs, attrs, ctx):
    return (_resize(inputs[0], attrs["scales"], None, None, attrs, ctx, opset10=True),)


@op("Upsample", 9, check=_check_resize, host_inputs=(1,))
def _upsample_input(inputs, attrs, ctx):
    return (_resize(inputs[0], _floats(inputs[1]), None, None, attrs, ctx, opset10=True),)

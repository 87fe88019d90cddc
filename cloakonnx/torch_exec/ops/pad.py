"""Pad in all its modes (constant, reflect, edge, wrap), with negative pads and ``axes``.

A file of its own because torch pads only the last 1-3 axes in the non-constant modes, so these
are padded one axis at a time through a 3-d view.
"""
from __future__ import annotations

import torch.nn.functional as F

from ..registry import op
from ..tensors import _empty, _ints, _is_float, _norm_axes, _pt_pad, _scalar


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


@op("Pad", 1, 2, check=_check_pad, host_inputs=(1, 2, 3))  # 1 names pads "paddings"
def _pad_v1(inputs, attrs, ctx):
    pads = attrs.get("pads", attrs.get("paddings"))
    return (_pad(inputs[0], pads, attrs.get("mode", "constant"), attrs.get("value", 0.0)),)


@op("Pad", 11, 13, 18, 19, 21, 23, 24, 25, check=_check_pad, host_inputs=(1, 2, 3))  # 18: axes, 19: wrap
def _pad_v11(inputs, attrs, ctx):
    x = inputs[0]
    value = _scalar(inputs[2]) if len(inputs) > 2 and not _empty(inputs[2]) else 0
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    return (_pad(x, _ints(inputs[1]), attrs.get("mode", "constant"), value, axes),)

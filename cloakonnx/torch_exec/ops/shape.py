"""Shape and layout ops: Shape, Size, Flatten, Reshape, Transpose, Concat, Split, Slice,
Squeeze, Unsqueeze, Expand, Tile, DepthToSpace, SpaceToDepth.

These move or view data without computing on it; most read shapes, axes or sizes from an input
since some opset, which they declare as ``host_inputs`` so the planner keeps them on the CPU.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import op
from ..tensors import _empty, _ints, _norm_axes, _norm_axis


@op("Shape", 1, 13, 15, 19, 21, 23, 24, 25)  # 15: start, end
def _shape(inputs, attrs, ctx):
    shape = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", None)
    return (torch.tensor(shape[slice(start, end)], dtype=torch.int64, device=inputs[0].device),)


@op("Size", 1, 13, 19, 21, 23, 24, 25)
def _size(inputs, attrs, ctx):
    return (torch.tensor(inputs[0].numel(), dtype=torch.int64, device=inputs[0].device),)


@op("Flatten", 1, 9, 11, 13, 21, 23, 24, 25)  # 11: negative axis
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


@op("Reshape", 1, host_inputs=(1,))
def _reshape_attr(inputs, attrs, ctx):
    return (_reshape(inputs[0], attrs["shape"], False),)


@op("Reshape", 5, 13, 14, 19, 21, 23, 24, 25, host_inputs=(1,))  # 14: allowzero
def _reshape_input(inputs, attrs, ctx):
    return (_reshape(inputs[0], _ints(inputs[1]), bool(attrs.get("allowzero", 0))),)


@op("Transpose", 1, 13, 21, 23, 24, 25)
def _transpose(inputs, attrs, ctx):
    x = inputs[0]
    perm = attrs.get("perm") or list(range(x.dim() - 1, -1, -1))
    return (x.permute(perm),)


@op("Concat", 1, 4, 11, 13)  # 1: axis defaults to 1, 11: negative axis
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


@op("Split", 1, host_inputs=(1,))
def _split_v1(inputs, attrs, ctx):
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else attrs.get("split")
    return _split(inputs[0], attrs.get("axis", 0), sizes, ctx.n_outputs)


@op("Split", 2, 11, host_inputs=(1,))  # 11: negative axis
def _split_attr(inputs, attrs, ctx):
    return _split(inputs[0], attrs.get("axis", 0), attrs.get("split") or None, ctx.n_outputs)


@op("Split", 13, 18, host_inputs=(1,))  # 18: num_outputs
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


@op("Slice", 1, host_inputs=(1, 2, 3, 4))
def _slice_attr(inputs, attrs, ctx):
    return (_slice(inputs[0], attrs["starts"], attrs["ends"], attrs.get("axes"), None),)


@op("Slice", 10, 11, 13, host_inputs=(1, 2, 3, 4))  # 11: negative axes
def _slice_input(inputs, attrs, ctx):
    x = inputs[0]
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else None
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else None
    return (_slice(x, _ints(inputs[1]), _ints(inputs[2]), axes, steps),)


def _squeeze(x, axes):
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(_norm_axes(axes, x.dim()))) if axes else x


@op("Squeeze", 1, 11, host_inputs=(1,))
def _squeeze_attr(inputs, attrs, ctx):
    return (_squeeze(inputs[0], attrs.get("axes")),)


@op("Squeeze", 13, 21, 23, 24, 25, host_inputs=(1,))
def _squeeze_input(inputs, attrs, ctx):
    return (_squeeze(inputs[0], _ints(inputs[1]) if len(inputs) > 1 else None),)


def _unsqueeze(x, axes):
    rank = x.dim() + len(axes)
    for a in sorted(_norm_axes(axes, rank)):
        x = x.unsqueeze(a)
    return x


@op("Unsqueeze", 1, 11, host_inputs=(1,))
def _unsqueeze_attr(inputs, attrs, ctx):
    return (_unsqueeze(inputs[0], attrs["axes"]),)


@op("Unsqueeze", 13, 21, 23, 24, 25, host_inputs=(1,))
def _unsqueeze_input(inputs, attrs, ctx):
    return (_unsqueeze(inputs[0], _ints(inputs[1])),)


@op("Expand", 8, 13, host_inputs=(1,))
def _expand(inputs, attrs, ctx):
    x = inputs[0]
    shape = torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1])))
    return (x.expand(shape),)


@op("Tile", 6, 13, host_inputs=(1,))  # 1 took tiles and axis inputs
def _tile(inputs, attrs, ctx):
    return (inputs[0].repeat(_ints(inputs[1])),)


@op("DepthToSpace", 1, 11, 13, 28)  # 11: mode (before: DCR)
def _depth_to_space(inputs, attrs, ctx):
    x = inputs[0]
    b = attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "CRD":
        return (F.pixel_shuffle(x, b),)
    y = x.reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    return (y.reshape(n, c // (b * b), h * b, w * b),)


@op("SpaceToDepth", 1, 13, 28)  # 28: mode (before: DCR)
def _space_to_depth(inputs, attrs, ctx):
    x = inputs[0]
    b = attrs["blocksize"]
    n, c, h, w = x.shape
    if attrs.get("mode", "DCR") == "CRD":
        return (F.pixel_unshuffle(x, b),)
    y = x.reshape(n, c, h // b, b, w // b, b).permute(0, 3, 5, 1, 2, 4)
    return (y.reshape(n, c * b * b, h // b, w // b),)

"""Index-driven ops: Gather, GatherElements, GatherND, ScatterND, ScatterElements, Trilu,
OneHot, NonZero.

Grouped because they share the handling of negative indices and the advanced-indexing tuple
that GatherND and ScatterND address with.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import op
from ..tensors import _norm_axis, _scalar


def _fix_index(idx: torch.Tensor, size: int) -> torch.Tensor:
    idx = idx.to(torch.int64)
    return torch.where(idx < 0, idx + size, idx)


@op("Gather", 1, 11, 13)  # 11 allows negative indices (before: never valid)
def _gather(inputs, attrs, ctx):
    x, idx = inputs
    axis = _norm_axis(attrs.get("axis", 0), x.dim())
    idx = _fix_index(idx, x.shape[axis])
    out = x.index_select(axis, idx.reshape(-1))
    return (out.reshape(tuple(x.shape[:axis]) + tuple(idx.shape) + tuple(x.shape[axis + 1 :])),)


@op("GatherElements", 11, 13)
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


@op("GatherND", 11, 12, 13)  # 12: batch_dims
def _gather_nd(inputs, attrs, ctx):
    data, idx = inputs
    return (data[_nd_index(data, idx, attrs.get("batch_dims", 0))],)


_SCATTER_REDUCE = {"mul": "prod", "max": "amax", "min": "amin"}


@op("ScatterND", 11, 13, 16, 18)  # 16: reduction add/mul, 18: max/min
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


@op("ScatterElements", 11, 13, 16, 18)
def _scatter_elements(inputs, attrs, ctx):
    data, idx, updates = inputs
    axis = _norm_axis(attrs.get("axis", 0), data.dim())
    idx = _fix_index(idx, data.shape[axis])
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        return (torch.scatter(data, axis, idx, updates),)
    mode = {"add": "sum", **_SCATTER_REDUCE}[reduction]
    return (torch.scatter_reduce(data, axis, idx, updates, mode, include_self=True),)


@op("Trilu", 14, host_inputs=(1,))
def _trilu(inputs, attrs, ctx):
    x = inputs[0]
    k = int(_scalar(inputs[1])) if len(inputs) > 1 and inputs[1] is not None else 0
    return (torch.triu(x, k) if attrs.get("upper", 1) else torch.tril(x, k),)


@op("OneHot", 9, 11, 28, host_inputs=(1,))  # 11 allows negative indices (before: invalid)
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


@op("NonZero", 9, 13)
def _nonzero(inputs, attrs, ctx):
    return (torch.nonzero(inputs[0]).t().contiguous(),)
